//! The human-readable form of each view. Pure functions from views to
//! text, so that they are easy to test and `top` can reuse them.

use serde::Serialize;

use super::format::{self, bytes, micros, or_dash};
use super::table::Table;
use crate::broker::ORPHAN;
use crate::dbus::views::{
    BufferDetail, BufferView, ClientView, FenceInfo, HeapView, Statistics, Totals, WaiterInfo,
};

/// Everything `status` shows, gathered from several calls.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub bus: String,
    pub version: String,
    pub instance: String,
    pub started_at: u64,
    pub totals: Totals,
    pub heaps: Vec<HeapView>,
    pub statistics: Statistics,
    pub silent_ends: u64,
    /// Cache syncs that failed, and ENDs running now; `None` from a daemon
    /// too old to say.
    pub cache_syncs_failed: Option<u64>,
    pub cache_ends_running: Option<u64>,
    /// Hand-offs through buffer words: (planned, carried out).
    pub hand_offs: (u64, u64),
    /// Allocations carried out in heaps that may block, not answered yet,
    /// and the threads doing it (those of clients gone included); `None`
    /// from a daemon too old to say.
    pub allocations_in_flight: Option<u64>,
    pub allocations_running: Option<u64>,
    /// Closes waiting on the closing threads (those in hand included), and
    /// the threads; `None` from a daemon too old to say.
    pub closes_waiting: Option<u64>,
    pub closing_threads: Option<u64>,
}

pub fn status(s: &Status) -> String {
    let st = &s.statistics;
    let t = &s.totals;
    let refusals = if st.refusals.is_empty() {
        "none".to_owned()
    } else {
        st.refusals
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let lines = [
        ("Daemon", format!("dmabrokerd {} on {}", s.version, s.bus)),
        ("Instance", s.instance.clone()),
        ("Uptime", format::seconds(format::age_of(s.started_at))),
        ("Clients", t.clients.to_string()),
        ("Buffers", format!("{} ({})", t.buffers, bytes(t.bytes))),
        (
            "Fences",
            format!("{} held, {} waiting", t.fences, t.waiters),
        ),
        (
            "Grants",
            format!(
                "{} ({} waited; p50 {}, p99 {})",
                st.grants,
                st.waits,
                micros(st.wait_p50_us),
                micros(st.wait_p99_us)
            ),
        ),
        (
            "Allocations",
            format!(
                "{} ({} freed, {} imported, {} exported, {} adopted)",
                st.allocations, st.frees, st.imports, st.exports, st.adoptions
            ),
        ),
        ("Cache syncs", cache_syncs(s)),
        ("Writer lost", st.writer_lost.to_string()),
        ("Revocations", st.revocations.to_string()),
        ("Timeouts", st.timeouts.to_string()),
        ("Silent ends", s.silent_ends.to_string()),
        (
            "Hand-offs",
            format!(
                "{} in buffer words ({} planned)",
                s.hand_offs.1, s.hand_offs.0
            ),
        ),
        ("Refusals", refusals),
    ];
    let in_flight = match (s.allocations_in_flight, s.allocations_running) {
        (Some(n), Some(running)) => Some((
            "In flight",
            format!("{n} allocations ({running} heap threads running)"),
        )),
        _ => None,
    };
    let closes = match (s.closes_waiting, s.closing_threads) {
        (Some(waiting), Some(threads)) => {
            Some(("Closes", super::closes::status_line(waiting, threads)))
        }
        _ => None,
    };
    let mut out = String::new();
    for (key, value) in lines.into_iter().chain(in_flight).chain(closes) {
        out.push_str(&format!("{:<13}{value}\n", format!("{key}:")));
    }
    out.push('\n');
    out.push_str(&heaps(&s.heaps));
    out
}

/// The cache syncs line: done, skipped, and what a newer daemon adds.
fn cache_syncs(s: &Status) -> String {
    let st = &s.statistics;
    let mut out = format!(
        "{} ({} skipped for memfd",
        st.cache_syncs, st.cache_syncs_skipped
    );
    if let (Some(failed), Some(running)) = (s.cache_syncs_failed, s.cache_ends_running) {
        out.push_str(&format!(", {failed} failed, {running} ENDs running"));
    }
    out.push(')');
    out
}

pub fn heaps(heaps: &[HeapView]) -> String {
    let mut table = Table::new(&["HEAP", "BACKEND", ">BUFFERS", ">BYTES"]);
    for h in heaps {
        table.row(vec![
            h.name.clone(),
            h.backend.clone(),
            h.buffers.to_string(),
            bytes(h.bytes),
        ]);
    }
    table.render()
}

pub fn clients(clients: &[ClientView]) -> String {
    let mut table = Table::new(&[
        ">ID", ">PID", ">UID", "NAME", "RULE", "FENCING", ">BUFFERS", ">BYTES", ">HELD",
        ">WAITING", ">LONGEST", "UNIT", "EXE",
    ]);
    for c in clients {
        table.row(vec![
            c.id.to_string(),
            c.pid.to_string(),
            c.uid.to_string(),
            or_dash(&c.name),
            c.rule.clone(),
            c.autofence.clone(),
            c.buffers.to_string(),
            bytes(c.bytes),
            c.accesses_held.to_string(),
            c.requests_waiting.to_string(),
            wait_cell(c.longest_wait_us),
            or_dash(&c.unit),
            or_dash(&c.exe),
        ]);
    }
    if table.is_empty() {
        return "No clients are connected.\n".to_owned();
    }
    table.render()
}

fn wait_cell(us: u64) -> String {
    if us == 0 {
        "-".to_owned()
    } else {
        micros(us)
    }
}

fn fence_cell(f: &FenceInfo) -> String {
    let state = match f.state.as_str() {
        "held" => "",
        "word" => " word",
        _ => " kernel",
    };
    format!(
        "{} #{} c{} {}{state}",
        f.kind,
        f.access,
        f.holder,
        micros(f.age_us)
    )
}

fn waiter_cell(w: &WaiterInfo) -> String {
    format!("{} c{} {}", w.kind, w.client, micros(w.age_us))
}

fn list(items: Vec<String>) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(", ")
    }
}

/// Client 0 is no client: the hold or charge of a buffer taken back after
/// a restart that nobody has re-attached yet.
fn holder_cell(client: u64) -> String {
    if client == ORPHAN {
        "orphan".to_owned()
    } else {
        client.to_string()
    }
}

fn owner_cell(owner: u64) -> String {
    if owner == ORPHAN {
        "-".to_owned()
    } else {
        owner.to_string()
    }
}

pub fn buffers(buffers: &[BufferView]) -> String {
    let mut table = Table::new(&[
        ">ID", "HEAP", "NAME", ">SIZE", ">INODE", ">OWNER", "HOLDERS", "FENCES", "WAITERS",
    ]);
    for b in buffers {
        table.row(vec![
            b.id.to_string(),
            b.heap.clone(),
            or_dash(&b.name),
            bytes(b.size),
            b.inode.to_string(),
            owner_cell(b.owner),
            list(b.holders.iter().map(|&h| holder_cell(h)).collect()),
            list(b.fences.iter().map(fence_cell).collect()),
            list(b.waiters.iter().map(waiter_cell).collect()),
        ]);
    }
    if table.is_empty() {
        return "No buffers are allocated.\n".to_owned();
    }
    table.render()
}

pub fn buffer(d: &BufferDetail) -> String {
    let b = &d.buffer;
    let lines = [
        ("Buffer", b.id.to_string()),
        ("Name", or_dash(&b.name)),
        ("Heap", format!("{} ({})", b.heap, b.backend)),
        ("Size", format!("{} ({} bytes)", bytes(b.size), b.size)),
        ("Inode", b.inode.to_string()),
        (
            "dma-buf",
            if d.dma_buf { "yes" } else { "no (memfd)" }.to_owned(),
        ),
        (
            "Owner",
            if b.owner == ORPHAN {
                "nobody (taken back after a restart; charged to no one until its owner re-attaches)"
                    .to_owned()
            } else {
                format!("client {}", b.owner)
            },
        ),
        ("Age", format::seconds(format::age_of(b.created_at))),
        ("Share tokens", d.share_tokens.to_string()),
    ];
    let mut out = String::new();
    for (key, value) in lines {
        out.push_str(&format!("{:<14}{value}\n", format!("{key}:")));
    }

    out.push_str("\nHolders:\n");
    let mut holders = Table::new(&[">CLIENT", ">PID", "NAME", ">HELD FOR", "CHARGED"]);
    for h in &d.holders {
        let orphan = h.client == ORPHAN;
        holders.row(vec![
            holder_cell(h.client),
            if orphan {
                "-".to_owned()
            } else {
                h.pid.to_string()
            },
            if orphan {
                "(not re-attached)".to_owned()
            } else {
                or_dash(&h.name)
            },
            micros(h.held_for_us),
            // An orphaned hold is no client's, so nobody is charged for
            // it, whatever the owner field (also ORPHAN) says.
            if !orphan && h.client == b.owner {
                "yes"
            } else {
                ""
            }
            .to_owned(),
        ]);
    }
    out.push_str(&holders.render());

    out.push_str("\nFences:\n");
    if b.fences.is_empty() {
        out.push_str("none\n");
    } else {
        let mut fences = Table::new(&[">ACCESS", "KIND", ">HOLDER", "STATE", "MODE", ">AGE"]);
        for f in &b.fences {
            fences.row(vec![
                f.access.to_string(),
                f.kind.clone(),
                f.holder.to_string(),
                f.state.clone(),
                f.mode.clone(),
                micros(f.age_us),
            ]);
        }
        out.push_str(&fences.render());
    }

    out.push_str("\nWaiters:\n");
    if b.waiters.is_empty() {
        out.push_str("none\n");
    } else {
        let mut waiters = Table::new(&[">WAITER", ">CLIENT", "KIND", ">WAITING"]);
        for w in &b.waiters {
            waiters.row(vec![
                w.waiter.to_string(),
                w.client.to_string(),
                w.kind.clone(),
                micros(w.age_us),
            ]);
        }
        out.push_str(&waiters.render());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dbus::views::HolderInfo;

    #[test]
    fn buffer_rows_show_fences_and_waiters() {
        let view = BufferView {
            id: 7,
            heap: "memfd".into(),
            backend: "memfd".into(),
            size: 4096,
            owner: 1,
            holders: vec![1, 2],
            fences: vec![FenceInfo {
                access: 3,
                kind: "cpu-write".into(),
                holder: 1,
                state: "held".into(),
                mode: "autofence".into(),
                age_us: 1500,
            }],
            waiters: vec![WaiterInfo {
                waiter: 4,
                client: 2,
                kind: "cpu-read".into(),
                age_us: 900,
            }],
            ..Default::default()
        };
        let text = buffers(&[view]);
        assert!(text.contains("cpu-write #3 c1 1.5ms"), "{text}");
        assert!(text.contains("cpu-read c2 900µs"), "{text}");
        assert!(text.contains("1, 2"), "{text}");
    }

    fn holder(client: u64, pid: i32) -> HolderInfo {
        HolderInfo {
            client,
            pid,
            name: String::new(),
            held_for_us: 1000,
        }
    }

    /// The CHARGED cell of each holder row, in order.
    fn charged_cells(text: &str) -> Vec<bool> {
        text.lines()
            .skip_while(|l| !l.starts_with("Holders:"))
            .skip(2)
            .take_while(|l| !l.is_empty())
            .map(|l| l.trim_end().ends_with("yes"))
            .collect()
    }

    /// After a restart, taken-back buffers are charged to nobody until
    /// their holders re-attach: the owner and every unclaimed hold are
    /// client 0, and every holder row said CHARGED yes, the owner
    /// "client 0".
    #[test]
    fn orphaned_holds_are_charged_to_nobody() {
        let detail = BufferDetail {
            buffer: BufferView {
                id: 3,
                size: 4096,
                inode: 77,
                owner: 0,
                holders: vec![0, 0],
                ..Default::default()
            },
            holders: vec![holder(0, 0), holder(0, 0)],
            ..Default::default()
        };
        let text = buffer(&detail);
        assert_eq!(charged_cells(&text), [false, false], "{text}");
        assert!(!text.contains("client 0"), "{text}");
        assert!(text.contains("nobody"), "{text}");
        let rows = buffers(std::slice::from_ref(&detail.buffer));
        assert!(!rows.contains(" 0 "), "no client 0 in the row: {rows}");
        assert!(rows.contains("orphan, orphan"), "{rows}");

        // One holder re-attached and took the charge back.
        let detail = BufferDetail {
            buffer: BufferView {
                id: 3,
                owner: 5,
                holders: vec![5, 0],
                ..Default::default()
            },
            holders: vec![holder(5, 4242), holder(0, 0)],
            ..Default::default()
        };
        let text = buffer(&detail);
        assert_eq!(charged_cells(&text), [true, false], "{text}");
        assert!(text.contains("client 5"), "{text}");
    }

    /// The closing threads' counts are a line of their own, left out
    /// against a daemon too old to say.
    #[test]
    fn status_gives_the_closes_when_the_daemon_says() {
        let mut s = Status {
            bus: "the session bus".into(),
            version: "0.1.0".into(),
            instance: "dmab1-x".into(),
            started_at: 0,
            totals: Totals::default(),
            heaps: Vec::new(),
            statistics: Statistics::default(),
            silent_ends: 0,
            cache_syncs_failed: None,
            cache_ends_running: None,
            hand_offs: (0, 0),
            allocations_in_flight: Some(0),
            allocations_running: Some(0),
            closes_waiting: Some(2),
            closing_threads: Some(3),
        };
        let text = status(&s);
        assert!(
            text.contains("\nIn flight:   0 allocations (0 heap threads running)\nCloses:      2 waiting (3 closing threads)\n"),
            "{text}"
        );
        s.closes_waiting = None;
        s.closing_threads = None;
        assert!(!status(&s).contains("Closes:"));
    }
}
