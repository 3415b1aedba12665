//! Decoding, validating and answering requests: the hello, buffers'
//! life cycle (alloc, import, adopt, free) and sharing. Every check runs
//! before anything is created or sent, so a refused request changes nothing.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use dmabroker_ipc::codec::{decode_request, decode_request_head};
use dmabroker_ipc::{
    features, BufferId, BufferInfo, ClientId, ErrorCode, HeapInfo, QuotaDetail, ReplyBody, Request,
    RequestBody, ShareToken, Welcome, WireError, FLAG_NO_REPLY, PROTOCOL_VERSION,
};

use super::access::Answer;
use super::endpage::EndPage;
use super::state::{Before, BufferEntry, BufferOrigin, ClientEntry, State};
use crate::client_fds::ClientFd;
use crate::heaps::AllocError;
use crate::held_files::HeldFd;
use crate::kernel::dma_buf;

/// What the connection task should do after a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Disposition {
    Continue,
    Disconnect,
}

fn protocol_error(message: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::ProtocolError, message)
}

impl State {
    /// Handles one datagram from `client`. `fds` are already owned: any we
    /// do not keep are closed, off this thread (see `client_fds`).
    pub fn handle_message(
        &mut self,
        client: ClientId,
        bytes: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Disposition {
        let fds = if fds.is_empty() {
            Vec::new()
        } else {
            let uid = self
                .clients
                .get(&client)
                .map_or(u32::MAX, |c| c.peer.accountable_uid);
            ClientFd::all(fds, uid)
        };
        let request = match decode_request(bytes) {
            Ok(request) => request,
            Err(err) => {
                let id = decode_request_head(bytes).map_or(0, |h| h.id);
                return self.refuse_malformed(client, id, protocol_error(err.to_string()));
            }
        };
        let id = request.head.id;
        if usize::from(request.head.fds) != fds.len() {
            return self.refuse_malformed(
                client,
                id,
                protocol_error(format!(
                    "message declares {} fds but {} arrived",
                    request.head.fds,
                    fds.len()
                )),
            );
        }
        if request.body.expected_fds() != fds.len() {
            return self.refuse_malformed(
                client,
                id,
                protocol_error(format!(
                    "{} takes {} fds, not {}",
                    request.body.kind(),
                    request.body.expected_fds(),
                    fds.len()
                )),
            );
        }
        // Checked before the count of protocol errors is reset, so that a
        // client repeating this mistake is cut off like one sending garbage.
        if let RequestBody::End {
            fence_slot: Some(slot @ 1..),
            ..
        } = request.body
        {
            let err = protocol_error(format!("fd slot {slot} does not exist"));
            return self.refuse_malformed(client, id, err);
        }
        if let Some(c) = self.clients.get_mut(&client) {
            c.protocol_errors = 0;
        }
        self.dispatch(client, request, fds)
    }

    /// Answers a message that broke the protocol. A client that keeps doing
    /// so is cut off rather than allowed to burn the broker's time.
    /// A request whose fds the daemon had no room to receive (its fd table
    /// is full): answered `Busy` under its own id, since trying again later
    /// may work, and not held against the client.
    pub fn refuse_for_lack_of_fds(&mut self, client: ClientId, bytes: &[u8]) -> Disposition {
        let id = decode_request_head(bytes).map_or(0, |h| h.id);
        tracing::warn!(client, "out of file descriptors: refused a request's fds");
        let error = WireError::new(
            ErrorCode::Busy,
            "the daemon has no file descriptors to spare for this request's fds: try again",
        );
        self.reply(client, id, Err(error), Vec::new());
        Disposition::Continue
    }

    pub fn refuse_malformed(&mut self, client: ClientId, id: u64, error: WireError) -> Disposition {
        tracing::debug!(client, error = %error, "malformed message");
        self.reply(client, id, Err(error), Vec::new());
        let limit = self.limits.max_protocol_errors;
        match self.clients.get_mut(&client) {
            Some(c) => {
                c.protocol_errors += 1;
                if c.protocol_errors >= limit {
                    tracing::warn!(client, "too many malformed messages; disconnecting");
                    Disposition::Disconnect
                } else {
                    Disposition::Continue
                }
            }
            None => Disposition::Disconnect,
        }
    }

    fn dispatch(
        &mut self,
        client: ClientId,
        request: Request,
        mut fds: Vec<ClientFd>,
    ) -> Disposition {
        let Request { head, body } = request;
        let hello_done = self.clients.get(&client).is_some_and(|c| c.hello_done);
        if let (RequestBody::Hello(hello), false) = (&body, hello_done) {
            let (result, fds) = match self.hello(client, hello) {
                Ok((welcome, fds)) => (Ok(ReplyBody::Welcome(welcome)), fds),
                Err(err) => (Err(err), Vec::new()),
            };
            let fatal = result.is_err();
            self.reply(client, head.id, result, fds);
            return if fatal {
                Disposition::Disconnect
            } else {
                Disposition::Continue
            };
        }
        let result = if !hello_done {
            Err(WireError::new(
                ErrorCode::HelloRequired,
                "the first request must be a hello",
            ))
        } else {
            match body {
                RequestBody::Hello(_) => Err(WireError::new(
                    ErrorCode::HelloRequired,
                    "hello may only be sent once",
                )),
                RequestBody::ListHeaps => self
                    .list_heaps(client)
                    .map(|heaps| Answer::Reply(heaps, Vec::new())),
                RequestBody::Alloc { size, heap, name } => {
                    let asked = super::allocate::Asked {
                        request_id: head.id,
                        reply: head.flags & FLAG_NO_REPLY == 0,
                        size,
                        heap: heap.as_deref(),
                        name: name.as_deref(),
                    };
                    self.alloc(client, asked)
                }
                RequestBody::Free { buffer } => self.free(client, buffer),
                RequestBody::Export { buffer } => self.export(client, buffer),
                RequestBody::Import { token } => self.import(client, &token),
                RequestBody::Info { buffer } => self.info(client, buffer),
                RequestBody::Adopt { name } => match fds.pop() {
                    Some(fd) => self.adopt(client, fd, name.as_deref()),
                    None => Err(protocol_error("adopt needs the dma-buf fd")),
                },
                RequestBody::Begin {
                    buffer,
                    access,
                    timeout_ms,
                } => self.begin(client, head.id, buffer, access, timeout_ms),
                RequestBody::End { access, fence_slot } => {
                    // Slot 0 is the only one (`handle_message`).
                    let sync_file = fence_slot.and_then(|_| fds.pop());
                    self.end(client, access, sync_file)
                }
                RequestBody::Reattach { buffer, secret } => self.reattach(client, buffer, &secret),
                RequestBody::WordEnded { buffer } => self.word_ended(client, buffer),
                RequestBody::Cancel { request } => self.cancel(client, request),
            }
        };
        match result {
            Ok(Answer::Reply(body, fds)) => {
                if head.flags & FLAG_NO_REPLY == 0 {
                    self.reply(client, head.id, Ok(body), fds);
                }
            }
            Ok(Answer::Deferred) => {}
            Err(err) => self.reply(client, head.id, Err(err), Vec::new()),
        }
        Disposition::Continue
    }

    fn hello(
        &mut self,
        client: ClientId,
        hello: &dmabroker_ipc::Hello,
    ) -> Result<(Welcome, Vec<Arc<HeldFd>>), WireError> {
        if hello.version != PROTOCOL_VERSION {
            return Err(WireError::new(
                ErrorCode::IncompatibleVersion,
                format!(
                    "this broker speaks protocol version {PROTOCOL_VERSION}, the client {}; upgrade the older side",
                    hello.version
                ),
            ));
        }
        let instance = self.instance.clone();
        let entry = self
            .clients
            .get_mut(&client)
            .ok_or_else(|| WireError::new(ErrorCode::Internal, "unknown client"))?;
        let default_heap = self
            .heaps
            .default_for(entry.resolved.limits.heaps.as_deref())
            .to_owned();
        let mode = entry.resolved.limits.autofence;
        let rule = &entry.resolved.rule;
        let autofence = mode.grant(hello.autofence).ok_or_else(|| {
            WireError::new(
                ErrorCode::PermissionDenied,
                format!("rule '{rule}': autofence is required for this client"),
            )
        })?;
        entry.autofence = autofence;
        entry.hello_done = true;
        entry.name = shown_name(&hello.client_name);
        let mut features = hello.features & features::ALL;
        entry.buffer_words = features & features::BUFFER_WORDS != 0;
        entry.cancel = features & features::CANCEL != 0;
        let mut fds = Vec::new();
        if features & features::END_WORDS != 0 {
            match EndPage::create() {
                Ok((page, fd)) => {
                    entry.end_page = Some(page);
                    fds.push(Arc::new(fd.into()));
                }
                Err(err) => {
                    // Ends then simply travel as messages.
                    tracing::warn!(client, error = %err, "no end-word page for this client");
                    features &= !features::END_WORDS;
                }
            }
        }
        let welcome = Welcome {
            version: PROTOCOL_VERSION,
            features,
            client_id: client,
            autofence,
            default_heap,
            instance,
        };
        Ok((welcome, fds))
    }

    /// The heaps the client may allocate from, its default first (see
    /// `HeapRegistry::heaps_for`).
    fn list_heaps(&self, client: ClientId) -> Result<ReplyBody, WireError> {
        let entry = self
            .clients
            .get(&client)
            .ok_or_else(|| WireError::new(ErrorCode::Internal, "unknown client"))?;
        Ok(ReplyBody::Heaps(
            self.heaps
                .heaps_for(entry.resolved.limits.heaps.as_deref())
                .iter()
                .map(|h| HeapInfo {
                    name: h.name.clone(),
                    backend: h.backend.name().to_owned(),
                })
                .collect(),
        ))
    }

    /// Quota checks shared by alloc, import and adopt. `charged` is the
    /// number of bytes the client would be charged for (0 for an import).
    /// Whether `client` may take one more buffer of `size` bytes: a new
    /// one it is `charged` for (alloc, adopt), or one more hold of a
    /// buffer someone else is charged for (import, adopt of a brokered
    /// dma-buf). `max_total_bytes` bounds its charge after a new buffer,
    /// and everything it holds, charged or not, after a new hold: an
    /// importer is charged once the owner lets go, so admitting holds by
    /// charge alone let one connection hand its whole quota to another,
    /// over and over (the other then charged many times its limit).
    ///
    /// A connection that took over one from before a restart counts the
    /// holds of that one it has yet to re-attach as its own (see
    /// `State::reattach`): taken before them, a new buffer would make the
    /// next record's holds of that connection more than its limits.
    ///
    /// `of` is the buffer the new hold would be of, `None` for a new
    /// buffer: a hold of a buffer the client's uid holds already adds
    /// nothing to what `max_uid_buffers` counts.
    pub(super) fn check_quota(
        &self,
        client: ClientId,
        size: u64,
        charged: bool,
        of: Option<BufferId>,
    ) -> Result<(), WireError> {
        let awaiting = match self.clients.get(&client).and_then(|c| c.reattaching) {
            Some(Before::Client(before)) => self.awaiting(before, None),
            _ => super::persist::Awaiting::default(),
        };
        self.check_quota_with(client, size, charged, of, awaiting)
    }

    /// [`State::check_quota`] with the holds still `awaiting` re-attach
    /// counted as the client's own for the limits of one connection
    /// (`max_uid_buffers` counts them for their user already, see
    /// `Holder::counted_for`).
    pub(super) fn check_quota_with(
        &self,
        client: ClientId,
        size: u64,
        charged: bool,
        of: Option<BufferId>,
        awaiting: super::persist::Awaiting,
    ) -> Result<(), WireError> {
        let entry = self
            .clients
            .get(&client)
            .ok_or_else(|| WireError::new(ErrorCode::Internal, "unknown client"))?;
        let limits = &entry.resolved.limits;
        let rule = &entry.resolved.rule;
        let refuse = |what: &str, limit: u64, in_use: u64, requested: u64| {
            let mut err = WireError::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "rule '{rule}': {what} limit {limit}, in use {in_use}, requested {requested}"
                ),
            );
            err.quota = Some(QuotaDetail {
                limit,
                in_use,
                requested,
            });
            err
        };
        if size > limits.max_buffer_size {
            return Err(refuse("max_buffer_size", limits.max_buffer_size, 0, size));
        }
        // Allocations still being carried out count as the buffers they
        // will be, charged and held.
        let held = (entry.buffers.len() + entry.allocating.len()) as u64 + awaiting.holds;
        if held + 1 > limits.max_buffers {
            return Err(refuse("max_buffers", limits.max_buffers, held, 1));
        }
        // Counted as its maker (a process of a user's namespace): the
        // stricter of its rule and the maker's own applies, as for
        // `max_uid_connections`, so neither is escaped through the other.
        let makers = entry
            .peer
            .counted_as_its_maker()
            .map(|maker| self.policy.resolve_user(maker))
            .filter(|makers| makers.limits.max_uid_buffers < limits.max_uid_buffers);
        let (uid_limit, uid_rule) = match &makers {
            Some(makers) => (makers.limits.max_uid_buffers, makers.rule.as_str()),
            None => (limits.max_uid_buffers, rule.as_str()),
        };
        let uid_limit = u64::from(uid_limit);
        let counted = self.uid_held.get(&entry.peer.accountable_uid);
        let uid_held = counted.map_or(0, super::state::UidHeld::count);
        let held_already =
            of.is_some_and(|buffer| counted.is_some_and(|c| c.buffers.contains_key(&buffer)));
        if !held_already && uid_held + 1 > uid_limit {
            let mut err = refuse("max_uid_buffers", uid_limit, uid_held, 1);
            err.message = format!(
                "rule '{uid_rule}': max_uid_buffers limit {uid_limit}, in use {uid_held}, requested 1 ({})",
                entry.peer.counted_as_text()
            );
            return Err(err);
        }
        let in_use = if charged {
            entry.charged_bytes.saturating_add(awaiting.charged_bytes)
        } else {
            entry.held_bytes.saturating_add(awaiting.held_bytes)
        }
        .saturating_add(entry.allocating_bytes());
        if in_use.saturating_add(size) > limits.max_total_bytes {
            return Err(refuse(
                "max_total_bytes",
                limits.max_total_bytes,
                in_use,
                size,
            ));
        }
        Ok(())
    }

    pub(super) fn buffer_info(&self, id: BufferId, secret: String) -> BufferInfo {
        match self.buffers.get(&id) {
            Some(b) => BufferInfo {
                id,
                size: b.size,
                heap: b.heap.clone(),
                name: b.name.clone(),
                inode: b.inode,
                secret,
            },
            None => BufferInfo {
                id,
                size: 0,
                heap: String::new(),
                name: String::new(),
                inode: 0,
                secret,
            },
        }
    }

    fn held(&self, client: ClientId, buffer: BufferId) -> Result<&BufferEntry, WireError> {
        // Someone else's buffer looks exactly like a missing one: ids are
        // guessable, existence is not to be revealed.
        self.buffers
            .get(&buffer)
            .filter(|b| b.held_by(client))
            .ok_or_else(|| {
                WireError::new(
                    ErrorCode::UnknownBuffer,
                    format!("you hold no buffer {buffer}"),
                )
            })
    }

    fn free(&mut self, client: ClientId, buffer: BufferId) -> Result<Answer, WireError> {
        self.held(client, buffer)?;
        // The answer that gave the client this buffer still waits in the
        // daemon, keeping the buffer's fd: freed now, the buffer would be
        // charged to no one while kept open for an answer nobody may
        // ever read. A client learns a buffer's id from that answer, so
        // one that frees it first guessed the id (they are sequential),
        // and sending allocations without reading, each followed by such
        // a free, had the daemon keep hundreds of buffers open for it.
        let unsent = match (self.clients.get(&client), self.buffers.get(&buffer)) {
            (Some(c), Some(entry)) => c.outbox.has_queued(&entry.fd),
            _ => false,
        };
        if unsent {
            return Err(WireError::new(
                ErrorCode::Busy,
                format!(
                    "buffer {buffer}'s answer has not reached you yet (earlier answers are unread): read it, then free the buffer"
                ),
            ));
        }
        let outer = self.leaving.replace(super::state::Leaving {
            client,
            buffer: Some(buffer),
        });
        self.let_go(client, buffer);
        self.leaving = outer;
        Ok(Answer::Reply(ReplyBody::Freed, Vec::new()))
    }

    /// [`State::free`], while nothing may be granted to `client` on
    /// `buffer`.
    fn let_go(&mut self, client: ClientId, buffer: BufferId) {
        let freed_while_waiting = super::access::freed_while_waiting;
        // Its queued begins on the buffer go first: a settle below could
        // grant them to it.
        self.take_out_waiters_of(client, Some(buffer), |_| Some(freed_while_waiting()));
        // Its accesses held in the buffer's word become fences first, so
        // they are released like any other.
        let now = Instant::now();
        self.take_over_word(buffer, now, false);
        self.settle_buffer(buffer, false, now);
        // A write the client ended through its word is not a lost one.
        self.settle_client(client, Some(buffer));
        let unsent = self.unsent_grants(client, Some(buffer));
        let gone = self
            .arbiter
            .release_client_buffer(client, buffer, Instant::now(), &unsent);
        // A grant held back by the dma-buf's kernel fences was never sent:
        // its begin is still waiting for an answer, like a queued one.
        let unanswered: Vec<u64> = gone
            .released
            .iter()
            .filter_map(|a| self.accesses.get(a))
            .filter(|a| a.pending.is_some())
            .map(|a| a.request_id)
            .collect();
        for request_id in unanswered {
            self.reply(client, request_id, Err(freed_while_waiting()), Vec::new());
        }
        self.finish_released(&gone.released);
        for waiter in &gone.cancelled_waiters {
            if let Some(w) = self.remove_waiter(*waiter) {
                self.reply(client, w.request_id, Err(freed_while_waiting()), Vec::new());
            }
        }
        self.deliver_grants(gone.grants);
        self.release_hold(client, buffer);
    }

    /// A holder ended an access in the buffer's word while the broker
    /// arbitrated it: settle now (the end may free a waiter). Stale or
    /// repeated messages find nothing to do.
    fn word_ended(&mut self, client: ClientId, buffer: BufferId) -> Result<Answer, WireError> {
        self.held(client, buffer)?;
        let taken = self
            .buffers
            .get(&buffer)
            .and_then(|b| b.word.as_deref())
            .is_some_and(|ws| ws.taken);
        if taken {
            self.settle_buffer(buffer, false, Instant::now());
            self.touched.push(buffer);
        }
        Ok(Answer::Reply(ReplyBody::Ended, Vec::new()))
    }

    fn export(&mut self, client: ClientId, buffer: BufferId) -> Result<Answer, WireError> {
        self.held(client, buffer)?;
        if let Some(c) = self.clients.get(&client) {
            if !c.resolved.limits.may_export {
                return Err(WireError::new(
                    ErrorCode::PermissionDenied,
                    format!("rule '{}': may_export is false", c.resolved.rule),
                ));
            }
        }
        // One token per holder and buffer: exporting again hands out the
        // same one, so a client cannot grow the token table without bound.
        let token = match self.exports.get(&(buffer, client)) {
            Some(token) => *token,
            None => {
                let token = ShareToken::random()
                    .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?;
                self.tokens.insert(
                    token,
                    super::state::TokenEntry {
                        buffer,
                        exporter: client,
                    },
                );
                self.exports.insert((buffer, client), token);
                token
            }
        };
        self.stats.exports += 1;
        Ok(Answer::Reply(
            ReplyBody::Exported {
                token: token.to_string(),
            },
            Vec::new(),
        ))
    }

    fn import(&mut self, client: ClientId, token: &str) -> Result<Answer, WireError> {
        let unknown = || {
            WireError::new(
                ErrorCode::UnknownToken,
                "no such share token (it may have been revoked)",
            )
        };
        let token: ShareToken = token.parse().map_err(|_| unknown())?;
        let (buffer, exporter) = {
            let entry = self.tokens.get(&token).ok_or_else(unknown)?;
            (entry.buffer, entry.exporter)
        };
        let importer = self
            .clients
            .get(&client)
            .ok_or_else(|| WireError::new(ErrorCode::Internal, "unknown client"))?;
        let owner = self.clients.get(&exporter).ok_or_else(unknown)?;
        if !may_import_from(importer, owner) {
            return Err(WireError::new(
                ErrorCode::PermissionDenied,
                format!(
                    "rule '{}': may not import from uid {}",
                    importer.resolved.rule, owner.peer.identity.uid
                ),
            ));
        }
        let entry = self.buffers.get(&buffer).ok_or_else(unknown)?;
        if entry.held_by(client) {
            return Err(WireError::new(
                ErrorCode::InvalidArgument,
                format!("you already hold buffer {buffer}"),
            ));
        }
        let (size, fd) = (entry.size, Arc::clone(&entry.fd));
        self.check_quota(client, size, false, Some(buffer))?;
        let secret = self.add_holder(buffer, client);
        self.stats.imports += 1;
        Ok(Answer::Reply(
            ReplyBody::Buffer(self.buffer_info(buffer, secret)),
            vec![fd],
        ))
    }

    fn info(&mut self, client: ClientId, buffer: BufferId) -> Result<Answer, WireError> {
        self.held(client, buffer)?;
        Ok(Answer::Reply(
            ReplyBody::Buffer(self.buffer_info(buffer, String::new())),
            Vec::new(),
        ))
    }

    /// Registers a dma-buf from elsewhere. Anything that is not a dma-buf is
    /// refused (and closed when `fd` drops).
    fn adopt(
        &mut self,
        client: ClientId,
        fd: ClientFd,
        name: Option<&str>,
    ) -> Result<Answer, WireError> {
        let Some(fd) = fd.keep_held_if(dma_buf::is_foreign_dma_buf, true) else {
            return Err(WireError::new(
                ErrorCode::NotADmaBuf,
                "this fd is not a dma-buf, and only dma-bufs (file system magic 0x444d4142) can be adopted",
            ));
        };
        let size = dma_buf::size(fd.as_fd()).map_err(|e| {
            WireError::new(
                ErrorCode::InvalidArgument,
                format!("cannot size the dma-buf: {e}"),
            )
        })?;
        if size == 0 {
            return Err(WireError::new(
                ErrorCode::InvalidArgument,
                "the dma-buf is empty",
            ));
        }
        let inode = dma_buf::inode(fd.as_fd()).map_err(|e| {
            WireError::new(
                ErrorCode::InvalidArgument,
                format!("cannot stat the dma-buf: {e}"),
            )
        })?;
        // An equal inode number is the same dma-buf only where the kernel
        // numbers them uniquely (5.18 on); the file itself (kcmp) decides,
        // or where the kernel will not say, the size too.
        let brokered = self
            .buffers
            .values()
            .find(|b| {
                b.origin.is_dma_buf()
                    && b.inode == inode
                    && crate::kernel::same_file(b.fd.as_fd(), fd.as_fd()).unwrap_or(b.size == size)
            })
            .map(|b| b.id);
        if let Some(buffer) = brokered {
            return self.join_adopted(client, buffer);
        }
        self.check_quota(client, size, true, None)?;
        self.check_store_slot()?;
        let id = self.allocate_buffer_id().inspect_err(|err| {
            tracing::error!(error = %err, "an adopt is refused");
        })?;
        self.buffers.insert(
            id,
            BufferEntry {
                id,
                fd: Arc::new(fd),
                size,
                heap: "adopted".into(),
                origin: BufferOrigin::Adopted,
                name: shown_name(name.filter(|n| !n.is_empty()).unwrap_or("adopted")),
                inode,
                owner: client,
                holders: Vec::new(),
                created: SystemTime::now(),
                word: None,
            },
        );
        self.arbiter.add_buffer(id);
        if let Some(c) = self.clients.get_mut(&client) {
            c.charged_bytes += size;
        }
        let secret = self.add_holder(id, client);
        self.store_buffer(id);
        self.stats.adoptions += 1;
        // A new buffer in the table, announced as an allocation is: its
        // free is announced like any other.
        self.notice_allocated(id, client);
        Ok(Answer::Reply(
            ReplyBody::Buffer(self.buffer_info(id, secret)),
            Vec::new(),
        ))
    }

    /// Adopting a dma-buf the broker already brokers makes the client one
    /// more holder of that buffer, as an import would. A second entry for
    /// the same kernel object would have fences of its own: the broker
    /// would let this client read while another writes.
    ///
    /// Holding the fd is not consent enough: the client got it from
    /// somewhere, and the owner's side of sharing is the import rule, which
    /// is checked as for an import from the buffer's owner.
    fn join_adopted(&mut self, client: ClientId, buffer: BufferId) -> Result<Answer, WireError> {
        let entry = self
            .buffers
            .get(&buffer)
            .ok_or_else(|| WireError::new(ErrorCode::Internal, "adopted buffer vanished"))?;
        if entry.held_by(client) {
            return Err(WireError::new(
                ErrorCode::InvalidArgument,
                format!("you already hold this dma-buf (buffer {buffer})"),
            ));
        }
        let (size, owner) = (entry.size, entry.owner);
        let adopter = self
            .clients
            .get(&client)
            .ok_or_else(|| WireError::new(ErrorCode::Internal, "unknown client"))?;
        // After a restart the owner is known again only once it re-attaches
        // (or the grace period hands the charge on).
        let Some(owner) = self.clients.get(&owner) else {
            return Err(WireError::new(
                ErrorCode::Busy,
                "this dma-buf's owner has not re-attached since the broker restarted; try again",
            ));
        };
        if !may_import_from(adopter, owner) {
            return Err(WireError::new(
                ErrorCode::PermissionDenied,
                format!(
                    "rule '{}': this dma-buf is another client's, whose buffers you may not import",
                    adopter.resolved.rule
                ),
            ));
        }
        self.check_quota(client, size, false, Some(buffer))?;
        let secret = self.add_holder(buffer, client);
        self.stats.adoptions += 1;
        Ok(Answer::Reply(
            ReplyBody::Buffer(self.buffer_info(buffer, secret)),
            Vec::new(),
        ))
    }
}

/// The importer's side of sharing: its `import_from` rule, against the
/// client whose buffer it would hold (a token's exporter, or for an adopt
/// the buffer's owner).
fn may_import_from(importer: &ClientEntry, from: &ClientEntry) -> bool {
    importer
        .resolved
        .limits
        .import_from
        .allows(&importer.peer.identity, &from.peer.identity)
}

pub(super) fn alloc_error(err: AllocError) -> WireError {
    let code = match &err {
        AllocError::UnknownHeap { .. } => ErrorCode::UnknownHeap,
        AllocError::InvalidSize { .. } => ErrorCode::InvalidArgument,
        AllocError::HeapNotAllowed { .. } => ErrorCode::PermissionDenied,
        _ => ErrorCode::OutOfMemory,
    };
    WireError::new(code, err.to_string())
}

/// A name a client gave (itself, a buffer) as the views and logs show it:
/// at most 64 characters, with control and bidirectional formatting
/// characters, NUL included, shown as U+FFFD (`text::is_hidden_control`).
/// A D-Bus string may not hold a NUL: one in a view made the bus drop the
/// daemon's connection at every `ListClients`.
pub(super) fn shown_name(raw: &str) -> String {
    raw.chars().take(64).map(crate::text::shown_char).collect()
}

#[cfg(test)]
mod tests {
    use super::shown_name;

    /// A client's name reaches the views without what could hide or
    /// reorder it: a NUL, an escape, a right-to-left override.
    #[test]
    fn a_shown_name_holds_no_control_or_reordering_character() {
        assert_eq!(shown_name("cam\u{0}era"), "cam\u{fffd}era");
        assert_eq!(shown_name("cam\u{202e}0-arem"), "cam\u{fffd}0-arem");
        assert_eq!(shown_name("\u{2067}x\u{2069}"), "\u{fffd}x\u{fffd}");
        assert_eq!(shown_name("كاميرا"), "كاميرا");
        assert_eq!(shown_name(&"a".repeat(100)).chars().count(), 64);
    }

    /// `max_uid_buffers` counts the buffers of every connection of the
    /// accountable uid, each once however many of them hold it: a camera
    /// and a codec of one user sharing every frame take one fd-store
    /// slot a frame, and each shared buffer counted twice, halving the
    /// user's room. A new hold of a buffer the uid holds already is not
    /// refused at the limit (it adds nothing). A reload's value applies
    /// to the next request. Failed before: the shared buffer counted
    /// twice ("in use 4").
    #[test]
    fn max_uid_buffers_counts_a_buffer_two_connections_hold_once() {
        use dmabroker_ipc::ErrorCode;
        let mut bench = super::super::cache_end_tests::Bench::new();
        bench.use_policy("[default]\nmax_uid_buffers = 3\n");
        let (first, second) = (bench.client(), bench.client());
        let uid = bench.state.clients[&first].peer.accountable_uid;
        let own = bench.buffer(&[first], false);
        bench.buffer(&[first], false);
        assert!(bench.state.check_quota(second, 4096, true, None).is_ok());
        let shared = bench.buffer(&[second, first], false);
        bench
            .state
            .check_uid_held()
            .expect("the count matches the tables");
        let counted = |bench: &super::super::cache_end_tests::Bench| {
            bench.state.uid_held(uid).map_or(0, |held| held.count())
        };
        assert_eq!(counted(&bench), 3);
        for client in [first, second] {
            let err = bench
                .state
                .check_quota(client, 4096, false, None)
                .expect_err("the uid holds three");
            assert_eq!(err.code, ErrorCode::QuotaExceeded);
            assert!(
                err.message.starts_with(
                    "rule 'default': max_uid_buffers limit 3, in use 3, requested 1 (uid "
                ),
                "{}",
                err.message
            );
            let quota = err.quota.expect("quota figures");
            assert_eq!((quota.limit, quota.in_use, quota.requested), (3, 3, 1));
        }
        assert!(
            bench
                .state
                .check_quota(second, 4096, false, Some(own))
                .is_ok(),
            "a hold of a buffer the uid holds adds nothing"
        );
        bench.state.add_holder(own, second);
        assert_eq!(counted(&bench), 3);
        bench.use_policy("[default]\nmax_uid_buffers = 5\n");
        assert!(bench.state.check_quota(first, 4096, true, None).is_ok());
        bench.state.disconnect(second);
        assert!(bench.state.buffers[&shared].held_by(first));
        assert_eq!(counted(&bench), 3, "first holds all three still");
        bench
            .state
            .check_uid_held()
            .expect("the count matches the tables");
        bench.state.disconnect(first);
        assert!(bench.state.uid_held(uid).is_none());
        bench
            .state
            .check_uid_held()
            .expect("the count matches the tables");
    }
}
