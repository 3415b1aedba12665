//! Who called: the bus's own word, never the caller's.
//!
//! A method argument or a header field other than the bus-stamped sender
//! could be anything the caller likes; the message bus, in contrast, read
//! the caller's credentials from the kernel when it connected. So the
//! sender's unique name is the only thing taken from the message, and the
//! uid and groups come from `GetConnectionCredentials` on the bus itself.

use zbus::fdo::{self, DBusProxy};
use zbus::message::Header;
use zbus::names::BusName;
use zbus::Connection;

use super::views::{ClientView, CloseQueue};

/// The caller as the bus vouches for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    /// Primary and supplementary groups. Empty when the bus does not report
    /// them (the field is optional in the D-Bus specification), in which
    /// case only the uid can make the caller an administrator.
    pub gids: Vec<u32>,
}

pub async fn caller(connection: &Connection, header: &Header<'_>) -> fdo::Result<Caller> {
    let sender = header
        .sender()
        .ok_or_else(|| fdo::Error::AccessDenied("the call has no sender to identify".into()))?;
    let bus = DBusProxy::new(connection).await?;
    let credentials = bus
        .get_connection_credentials(BusName::Unique(sender.to_owned()))
        .await
        .map_err(|err| {
            fdo::Error::AccessDenied(format!("the bus could not identify the caller: {err}"))
        })?;
    let uid = credentials.unix_user_id().ok_or_else(|| {
        fdo::Error::AccessDenied("the bus did not report the caller's uid".into())
    })?;
    Ok(Caller {
        uid,
        gids: credentials.into_unix_group_ids().unwrap_or_default(),
    })
}

/// Blanks the executable and unit of clients of another uid than `viewer`
/// (all of them when the caller could not be identified). Reading another
/// user's `/proc/PID/exe` takes ptrace access, which the daemon has
/// (`CAP_SYS_PTRACE`) and an ordinary caller does not: repeating it to
/// anyone on the bus would get around the kernel's rule.
pub fn hide_foreign_executables(views: &mut [ClientView], viewer: Option<u32>) {
    for view in views.iter_mut().filter(|v| Some(v.uid) != viewer) {
        view.exe.clear();
        view.unit.clear();
    }
}

/// Replaces the ids of containers in `queues` with the first such id,
/// which says "a container" and no more: a container's id is its user
/// namespace's inode, which an ordinary caller could not read from
/// `/proc` of another user's process. Host uids and the id of peers not
/// identified stay; each container stays one user of its queue (two
/// containers' queue is still two users'), and the queues are sorted
/// again by users then lane.
pub fn hide_container_ids(queues: &mut [CloseQueue]) {
    for users in queues.iter_mut().map(|q| &mut q.users) {
        for uid in users.iter_mut() {
            if crate::identity::is_container_id(*uid) {
                *uid = crate::identity::FIRST_CONTAINER_ID;
            }
        }
        users.sort_unstable();
    }
    queues.sort_by(|a, b| (&a.users, &a.lane).cmp(&(&b.users, &b.lane)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(uid: u32) -> ClientView {
        ClientView {
            uid,
            exe: "/usr/bin/camera".into(),
            unit: "camera.service".into(),
            ..ClientView::default()
        }
    }

    #[test]
    fn only_the_viewers_own_clients_keep_their_executables() {
        let mut views = vec![client(1000), client(1001)];
        hide_foreign_executables(&mut views, Some(1000));
        assert_eq!(views[0].exe, "/usr/bin/camera");
        assert_eq!(views[0].unit, "camera.service");
        assert_eq!((views[1].exe.as_str(), views[1].unit.as_str()), ("", ""));

        hide_foreign_executables(&mut views, None);
        assert_eq!(views[0].exe, "", "an unidentified caller sees none");
    }

    /// A container's id (its namespace's inode) is an administrator's to
    /// see; others are told only that it is a container. Found by review.
    #[test]
    fn containers_are_named_only_to_administrators() {
        use crate::identity::{FIRST_CONTAINER_ID, UNACCOUNTED_UID};
        let queue = |users: Vec<u32>| CloseQueue {
            users,
            lane: "files".into(),
            ..CloseQueue::default()
        };
        let mut queues = vec![
            queue(vec![
                1000,
                FIRST_CONTAINER_ID + 5,
                FIRST_CONTAINER_ID + 9,
                UNACCOUNTED_UID,
            ]),
            queue(vec![FIRST_CONTAINER_ID + 1]),
            queue(vec![999]),
        ];
        hide_container_ids(&mut queues);
        let users: Vec<&[u32]> = queues.iter().map(|q| q.users.as_slice()).collect();
        assert_eq!(
            users,
            [
                &[999][..],
                &[
                    1000,
                    FIRST_CONTAINER_ID,
                    FIRST_CONTAINER_ID,
                    UNACCOUNTED_UID
                ][..],
                &[FIRST_CONTAINER_ID][..],
            ],
            "host uids and the unidentified stay, each container is one, sorted again"
        );
    }
}
