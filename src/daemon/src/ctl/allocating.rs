//! Allocations in flight in `dmabrokerctl`: a client's allocations still
//! carried out in a heap count against its quota, but not in the BUFFERS
//! and BYTES of `clients`, so they are listed where a refusal
//! (`QuotaExceeded`, `Busy`) is looked into: under the clients table, in
//! each client of `clients --json`, and in `top`. The existing columns
//! and keys stay as they were. A daemon older than these members (one
//! still running after an upgrade installed this tool) cannot say: then
//! the keys, the section and `top`'s column are left out, rather than
//! shown as "none in flight", which it does not know.

use serde::Serialize;

use super::bus::Daemon;
use super::error::CtlError;
use super::format::{bytes, micros, or_dash};
use super::table::Table;
use crate::dbus::views::{AllocationInFlight, ClientAllocations, ClientView};

/// Every client's allocations in flight; `None` from a daemon too old to
/// say (see [`Daemon::newer`]), which is not the same as none in flight.
pub async fn fetch(daemon: &Daemon) -> Result<Option<Vec<ClientAllocations>>, CtlError> {
    let answer = daemon.proxy.list_allocations_in_flight().await;
    daemon.newer("ListAllocationsInFlight", answer)
}

/// One client of `clients --json`: its view's keys as before, plus
/// `allocations_in_flight`, left out against a daemon too old to say.
#[derive(Debug, Serialize)]
pub struct ClientRow {
    #[serde(flatten)]
    pub client: ClientView,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocations_in_flight: Option<InFlight>,
}

/// A client's allocations in flight, without its id (the row has it).
#[derive(Debug, Default, Serialize)]
pub struct InFlight {
    pub count: u64,
    pub bytes: u64,
    pub allocations: Vec<AllocationInFlight>,
}

/// The rows of `clients --json`, in the clients' order; `in_flight` is
/// `None` from a daemon too old to say.
pub fn rows(clients: Vec<ClientView>, in_flight: Option<&[ClientAllocations]>) -> Vec<ClientRow> {
    clients
        .into_iter()
        .map(|client| {
            let allocations_in_flight = in_flight.map(|in_flight| {
                of(in_flight, client.id)
                    .map(|c| InFlight {
                        count: c.count,
                        bytes: c.bytes,
                        allocations: c.allocations.clone(),
                    })
                    .unwrap_or_default()
            });
            ClientRow {
                client,
                allocations_in_flight,
            }
        })
        .collect()
}

fn of(in_flight: &[ClientAllocations], client: u64) -> Option<&ClientAllocations> {
    in_flight.iter().find(|c| c.client == client)
}

/// The section under the clients table: one row per allocation, nothing
/// at all when there is none, or when the daemon is too old to say.
pub fn section(in_flight: Option<&[ClientAllocations]>) -> String {
    let in_flight = in_flight.unwrap_or_default();
    let mut table = Table::new(&[">CLIENT", "HEAP", "NAME", ">SIZE", ">AGE"]);
    for c in in_flight {
        for a in &c.allocations {
            table.row(vec![
                c.client.to_string(),
                or_dash(&a.heap),
                or_dash(&a.name),
                bytes(a.size),
                micros(a.age_us),
            ]);
        }
    }
    if table.is_empty() {
        return String::new();
    }
    format!(
        "\nAllocations in flight (each counts against its client's quota, \
         not yet in BUFFERS or BYTES):\n{}",
        table.render()
    )
}

/// `top`'s ALLOCATING cell of `client`: `2 (8 MiB)`, or `-` (the column
/// is left out against a daemon too old to say).
pub fn cell(in_flight: &[ClientAllocations], client: u64) -> String {
    match of(in_flight, client) {
        Some(c) if c.count > 0 => format!("{} ({})", c.count, bytes(c.bytes)),
        _ => "-".to_owned(),
    }
}

/// Every client's allocations in flight together: (count, bytes).
pub fn sum(in_flight: &[ClientAllocations]) -> (u64, u64) {
    in_flight
        .iter()
        .fold((0, 0), |(n, b), c| (n + c.count, b + c.bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_flight() -> Vec<ClientAllocations> {
        vec![ClientAllocations {
            client: 4,
            count: 1,
            bytes: 4 << 20,
            allocations: vec![AllocationInFlight {
                heap: "system".into(),
                size: 4 << 20,
                name: "frame".into(),
                age_us: 1500,
            }],
        }]
    }

    #[test]
    fn the_section_lists_each_allocation_or_nothing() {
        assert_eq!(section(Some(&[])), "");
        assert_eq!(section(None), "");
        let text = section(Some(&in_flight()));
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].starts_with("Allocations in flight"), "{text}");
        assert_eq!(lines[2], "CLIENT  HEAP    NAME    SIZE    AGE");
        assert_eq!(lines[3], "     4  system  frame  4 MiB  1.5ms");
    }

    #[test]
    fn json_rows_keep_the_view_and_add_the_allocations() {
        let clients = vec![
            ClientView {
                id: 4,
                name: "cam".into(),
                ..Default::default()
            },
            ClientView {
                id: 5,
                ..Default::default()
            },
        ];
        let json = serde_json::to_value(rows(clients, Some(&in_flight()))).expect("json");
        assert_eq!(json[0]["id"], 4);
        assert_eq!(json[0]["name"], "cam");
        assert_eq!(json[0]["allocations_in_flight"]["count"], 1);
        assert_eq!(
            json[0]["allocations_in_flight"]["allocations"][0]["heap"],
            "system"
        );
        assert_eq!(json[1]["allocations_in_flight"]["count"], 0);
        assert_eq!(cell(&in_flight(), 4), "1 (4 MiB)");
        assert_eq!(cell(&in_flight(), 5), "-");
        assert_eq!(sum(&in_flight()), (1, 4 << 20));
    }

    /// A daemon older than `ListAllocationsInFlight` cannot say what is
    /// in flight: its clients were shown with `count` 0, as if it had
    /// said none, where the docs promise the key is left out.
    #[test]
    fn against_an_older_daemon_the_allocations_are_left_out() {
        let clients = vec![ClientView {
            id: 4,
            ..Default::default()
        }];
        let json = serde_json::to_value(rows(clients, None)).expect("json");
        assert_eq!(json[0]["id"], 4);
        assert!(json[0].get("allocations_in_flight").is_none(), "{json}");
    }
}
