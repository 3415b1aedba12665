//! The daemon's closing threads in `dmabrokerctl`: `closes` lists their
//! queues with closes waiting, and `status` gives the two counts. A user
//! whose clients hang because a close is stuck (a FUSE file whose FLUSH
//! nobody answers, a dma-buf watched by an epoll a client holds locked)
//! shows here, and whether its connections are held back for it.

use super::bus::Daemon;
use super::error::CtlError;
use super::format::micros;
use super::table::Table;
use crate::dbus::views::CloseQueue;

/// Every queue with closes waiting or one in hand. A daemon older than
/// `ListCloses` cannot say: that is an error here, where nothing else is
/// asked for.
pub async fn fetch(daemon: &Daemon) -> Result<Vec<CloseQueue>, CtlError> {
    let answer = daemon.proxy.list_closes().await;
    daemon
        .newer("ListCloses", answer)?
        .ok_or_else(|| CtlError::Call {
            what: "ListCloses",
            message: "this dmabrokerd is older than the closing threads' view; restart it to \
                      run the installed version"
                .into(),
        })
}

/// `closes`: one row per queue.
pub fn table(queues: &[CloseQueue]) -> String {
    let mut table = Table::new(&[
        "USERS",
        "LANE",
        ">WAITING",
        "THREAD",
        ">IN HAND FOR",
        "HELD BACK",
    ]);
    for q in queues {
        table.row(vec![
            users(&q.users),
            q.lane.clone(),
            q.waiting.to_string(),
            thread_cell(q),
            if q.in_hand_us == 0 {
                "-".to_owned()
            } else {
                micros(q.in_hand_us)
            },
            if q.held_back { "yes" } else { "no" }.to_owned(),
        ]);
    }
    if table.is_empty() {
        return "No closes are waiting.\n".to_owned();
    }
    table.render()
}

/// `1000`, or `1000+1001` for a file those users have all held; a
/// container as `container:INODE` (`container` alone when the daemon
/// does not say which), peers not identified as `unidentified`.
fn users(uids: &[u32]) -> String {
    uids.iter()
        .map(|&uid| match uid {
            crate::identity::UNACCOUNTED_UID => "unidentified".to_owned(),
            crate::identity::FIRST_CONTAINER_ID => "container".to_owned(),
            uid if crate::identity::is_container_id(uid) => format!("container:{uid}"),
            uid => uid.to_string(),
        })
        .collect::<Vec<_>>()
        .join("+")
}

/// `in line` first: a queue whose thread is idle may wait in line for
/// leave to go busy again, and closes nothing meanwhile.
fn thread_cell(q: &CloseQueue) -> String {
    if q.in_line {
        "in line"
    } else if q.has_thread {
        "yes"
    } else {
        "no"
    }
    .to_owned()
}

/// `status`'s line: `1 waiting (3 closing threads)`.
pub fn status_line(waiting: u64, threads: u64) -> String {
    format!("{waiting} waiting ({threads} closing threads)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(users: &[u32], has_thread: bool, in_line: bool) -> CloseQueue {
        CloseQueue {
            users: users.to_vec(),
            lane: "files".into(),
            waiting: 2,
            has_thread,
            in_line,
            in_hand_us: if has_thread { 1500 } else { 0 },
            held_back: !has_thread,
        }
    }

    #[test]
    fn containers_and_unidentified_peers_are_named_as_such() {
        use crate::identity::{FIRST_CONTAINER_ID, UNACCOUNTED_UID};
        assert_eq!(
            users(&[
                1000,
                FIRST_CONTAINER_ID,
                FIRST_CONTAINER_ID + 7,
                UNACCOUNTED_UID
            ]),
            format!(
                "1000+container+container:{}+unidentified",
                FIRST_CONTAINER_ID + 7
            )
        );
    }

    #[test]
    fn each_queue_is_a_row_and_none_is_said() {
        assert_eq!(table(&[]), "No closes are waiting.\n");
        let idle_in_line = CloseQueue {
            in_hand_us: 0,
            ..queue(&[1003, 1004], true, true)
        };
        let text = table(&[
            queue(&[1000], true, false),
            queue(&[1000, 1001], false, true),
            queue(&[1002], false, false),
            idle_in_line,
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "USERS      LANE   WAITING  THREAD   IN HAND FOR  HELD BACK",
                "1000       files        2  yes            1.5ms  no",
                "1000+1001  files        2  in line            -  yes",
                "1002       files        2  no                 -  yes",
                "1003+1004  files        2  in line            -  no",
            ],
            "{text}"
        );
        assert_eq!(status_line(1, 3), "1 waiting (3 closing threads)");
    }
}
