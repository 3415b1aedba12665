//! Property test: the [`Arbiter`] against a deliberately naive reference
//! model, over random interleavings of every operation.
//!
//! The model keeps all fences and all waiters of the broker in two flat
//! vectors and, after each operation, serves the whole broker by repeatedly
//! granting the oldest waiter that is at the head of its buffer's queue and
//! compatible with that buffer's fences. That is the rule of docs/fences.md
//! read literally, without the arbiter's indexes, per-buffer passes and
//! batch merging, so a disagreement points at one of those optimisations.
//! Because the model serves *every* buffer, not only the touched one, a
//! wake-up the arbiter forgets shows up as a difference too.
//!
//! A hang-up or a free may name some of the client's grants as never sent
//! (the broker held them back), and the model applies rule 5's words for
//! those on its own: no lost writer, and the marks the grant took go back
//! to its buffer.
//!
//! Besides equality with the model, each step checks the safety and
//! liveness properties directly on the arbiter's own views, so that a bug
//! shared by both cannot hide them.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use dmabroker_fence::*;
use proptest::prelude::*;

/// Buffers 10 and 11 exist at the start; 12 never does (UnknownBuffer).
const BUFFERS: [BufferId; 3] = [10, 11, 12];
const CLIENTS: u64 = 3;

fn model_is_write(a: Access) -> bool {
    matches!(
        a,
        Access::CpuWrite | Access::CpuReadWrite | Access::DeviceWrite
    )
}

fn model_is_device(a: Access) -> bool {
    matches!(a, Access::DeviceRead | Access::DeviceWrite)
}

fn model_conflict(a: Access, b: Access) -> bool {
    model_is_write(a) || model_is_write(b)
}

#[derive(Clone, Debug)]
struct MFence {
    id: AccessId,
    buffer: BufferId,
    access: Access,
    holder: ClientId,
    mode: Mode,
    kernel: bool,
    since: Instant,
    /// The marks its grant carried, i.e. took from the buffer: a broker
    /// that never sends the grant hands them back in [`Unsent`].
    writer_lost: bool,
    revoked: bool,
}

impl MFence {
    fn view(&self) -> FenceView {
        FenceView {
            id: self.id,
            buffer: self.buffer,
            access: self.access,
            holder: self.holder,
            mode: self.mode,
            state: if self.kernel {
                FenceState::AwaitingKernelFence
            } else {
                FenceState::Held
            },
            since: self.since,
        }
    }
}

#[derive(Clone, Debug)]
struct MWaiter {
    id: WaiterId,
    buffer: BufferId,
    client: ClientId,
    access: Access,
    since: Instant,
}

impl MWaiter {
    fn view(&self) -> WaiterView {
        WaiterView {
            id: self.id,
            buffer: self.buffer,
            client: self.client,
            access: self.access,
            since: self.since,
        }
    }
}

#[derive(Debug)]
struct Model {
    next: u64,
    buffers: Vec<BufferId>,
    /// Every fence of the broker, oldest first.
    fences: Vec<MFence>,
    /// Every waiter of the broker, oldest first.
    queue: Vec<MWaiter>,
    lost: Vec<BufferId>,
    revoked: Vec<BufferId>,
}

impl Model {
    fn new() -> Self {
        Model {
            next: 1,
            buffers: vec![10, 11],
            fences: Vec::new(),
            queue: Vec::new(),
            lost: Vec::new(),
            revoked: Vec::new(),
        }
    }

    fn id(&mut self) -> u64 {
        self.next += 1;
        self.next - 1
    }

    fn compatible(&self, buffer: BufferId, access: Access) -> bool {
        self.fences
            .iter()
            .filter(|f| f.buffer == buffer)
            .all(|f| !model_conflict(f.access, access))
    }

    fn fences_on(&self, buffer: BufferId) -> Vec<FenceView> {
        self.fences
            .iter()
            .filter(|f| f.buffer == buffer)
            .map(MFence::view)
            .collect()
    }

    fn waiters_on(&self, buffer: BufferId) -> Vec<WaiterView> {
        self.queue
            .iter()
            .filter(|w| w.buffer == buffer)
            .map(MWaiter::view)
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn grant(
        &mut self,
        buffer: BufferId,
        client: ClientId,
        access: Access,
        mode: Mode,
        waiter: Option<WaiterId>,
        outstanding: Vec<FenceView>,
        now: Instant,
    ) -> Grant {
        let id = self.id();
        let writer_lost = self.lost.contains(&buffer);
        let revoked = self.revoked.contains(&buffer);
        self.fences.push(MFence {
            id,
            buffer,
            access,
            holder: client,
            mode,
            kernel: false,
            since: now,
            writer_lost,
            revoked,
        });
        Grant {
            access_id: id,
            waiter,
            buffer,
            client,
            access,
            mode,
            writer_lost,
            revoked,
            outstanding,
        }
    }

    fn clear_marks(&mut self, buffer: BufferId) {
        self.lost.retain(|&b| b != buffer);
        self.revoked.retain(|&b| b != buffer);
    }

    /// Grants, over the whole broker, the oldest waiter that heads its
    /// buffer's queue and fits, until none does. Marks are read during the
    /// operation and cleared at its end, so one batch shares them.
    fn serve(&mut self, now: Instant) -> Vec<Grant> {
        let mut grants: Vec<Grant> = Vec::new();
        loop {
            let pick = self.queue.iter().position(|w| {
                let head = self.queue.iter().find(|x| x.buffer == w.buffer).unwrap();
                head.id == w.id && self.compatible(w.buffer, w.access)
            });
            let Some(i) = pick else { break };
            let w = self.queue.remove(i);
            let g = self.grant(
                w.buffer,
                w.client,
                w.access,
                Mode::Autofence,
                Some(w.id),
                Vec::new(),
                now,
            );
            grants.push(g);
        }
        for g in &grants {
            self.clear_marks(g.buffer);
        }
        grants
    }

    fn begin(
        &mut self,
        client: ClientId,
        buffer: BufferId,
        access: Access,
        mode: Mode,
        now: Instant,
    ) -> Result<BeginOutcome, FenceError> {
        if !self.buffers.contains(&buffer) {
            return Err(FenceError::UnknownBuffer(buffer));
        }
        let outstanding = match mode {
            Mode::Autofence => {
                let queued = self.queue.iter().any(|w| w.buffer == buffer);
                if queued || !self.compatible(buffer, access) {
                    let id = self.id();
                    self.queue.push(MWaiter {
                        id,
                        buffer,
                        client,
                        access,
                        since: now,
                    });
                    return Ok(BeginOutcome::Queued(id));
                }
                Vec::new()
            }
            Mode::NoAutofence => self
                .fences
                .iter()
                .filter(|f| f.buffer == buffer && model_conflict(f.access, access))
                .map(MFence::view)
                .collect(),
        };
        let g = self.grant(buffer, client, access, mode, None, outstanding, now);
        self.clear_marks(buffer);
        Ok(BeginOutcome::Granted(g))
    }

    fn find(&self, client: ClientId, id: AccessId) -> Result<usize, FenceError> {
        let i = self
            .fences
            .iter()
            .position(|f| f.id == id)
            .ok_or(FenceError::UnknownAccess(id))?;
        if self.fences[i].holder != client {
            return Err(FenceError::NotHolder { access: id, client });
        }
        Ok(i)
    }

    fn end(
        &mut self,
        client: ClientId,
        id: AccessId,
        now: Instant,
    ) -> Result<Vec<Grant>, FenceError> {
        let i = self.find(client, id)?;
        if self.fences[i].kernel {
            return Err(FenceError::AlreadyFenced(id));
        }
        self.fences.remove(i);
        Ok(self.serve(now))
    }

    fn end_kernel(&mut self, client: ClientId, id: AccessId) -> Result<(), FenceError> {
        let i = self.find(client, id)?;
        if !model_is_device(self.fences[i].access) {
            return Err(FenceError::NotDeviceAccess(id));
        }
        if self.fences[i].kernel {
            return Err(FenceError::AlreadyFenced(id));
        }
        self.fences[i].kernel = true;
        Ok(())
    }

    fn signal(&mut self, id: AccessId, now: Instant) -> Vec<Grant> {
        match self.fences.iter().position(|f| f.id == id && f.kernel) {
            Some(i) => {
                self.fences.remove(i);
                self.serve(now)
            }
            None => Vec::new(),
        }
    }

    fn cancel(&mut self, id: WaiterId, now: Instant) -> Result<Vec<Grant>, FenceError> {
        let i = self
            .queue
            .iter()
            .position(|w| w.id == id)
            .ok_or(FenceError::UnknownWaiter(id))?;
        self.queue.remove(i);
        Ok(self.serve(now))
    }

    fn revoke(&mut self, id: AccessId, now: Instant) -> Result<Vec<Grant>, FenceError> {
        let i = self
            .fences
            .iter()
            .position(|f| f.id == id)
            .ok_or(FenceError::UnknownAccess(id))?;
        let f = self.fences.remove(i);
        if model_is_write(f.access) {
            self.revoked.push(f.buffer);
        }
        Ok(self.serve(now))
    }

    /// Rule 5: the client's held fences (on `only`, or on every buffer) go,
    /// and a write among them marks its buffer `writer_lost`. One among
    /// `unsent` is a grant never sent, so never the client's to use: it
    /// loses no writer, and the marks its grant took (kept on the fence
    /// here, not read from `unsent`) go back to its buffer.
    fn gone(
        &mut self,
        client: ClientId,
        only: Option<BufferId>,
        unsent: &[Unsent],
        now: Instant,
    ) -> ClientGone {
        let mut out = ClientGone::default();
        if only.is_some_and(|b| !self.buffers.contains(&b)) {
            return out;
        }
        let mine = |c: ClientId, b: BufferId| c == client && only.unwrap_or(b) == b;
        for f in &self.fences {
            if mine(f.holder, f.buffer) {
                if f.kernel {
                    out.kept_kernel_fences.push(f.id);
                } else {
                    out.released.push(f.id);
                    if unsent.iter().any(|u| u.access == f.id) {
                        if f.writer_lost {
                            self.lost.push(f.buffer);
                        }
                        if f.revoked {
                            self.revoked.push(f.buffer);
                        }
                    } else if model_is_write(f.access) {
                        self.lost.push(f.buffer);
                    }
                }
            }
        }
        self.fences
            .retain(|f| f.kernel || !mine(f.holder, f.buffer));
        out.cancelled_waiters = self
            .queue
            .iter()
            .filter(|w| mine(w.client, w.buffer))
            .map(|w| w.id)
            .collect();
        self.queue.retain(|w| !mine(w.client, w.buffer));
        out.grants = self.serve(now);
        out
    }

    fn remove_buffer(&mut self, buffer: BufferId) -> (Vec<FenceView>, Vec<WaiterView>) {
        let out = (self.fences_on(buffer), self.waiters_on(buffer));
        self.fences.retain(|f| f.buffer != buffer);
        self.queue.retain(|w| w.buffer != buffer);
        self.buffers.retain(|&b| b != buffer);
        self.clear_marks(buffer);
        out
    }

    fn add_buffer(&mut self, buffer: BufferId) {
        if !self.buffers.contains(&buffer) {
            self.buffers.push(buffer);
        }
    }

    fn held_by(&self, client: ClientId) -> usize {
        self.fences
            .iter()
            .filter(|f| f.holder == client && !f.kernel)
            .count()
    }

    fn waiting_for(&self, client: ClientId) -> usize {
        self.queue.iter().filter(|w| w.client == client).count()
    }
}

/// Which id an operation targets: mostly one that exists (picked by index
/// among the live ones at that step), sometimes an arbitrary one, so that
/// stale and never-issued ids are exercised too.
#[derive(Clone, Copy, Debug)]
enum Target {
    Live(usize),
    Raw(u64),
}

/// Who ends an access: usually its holder, sometimes anybody (NotHolder).
#[derive(Clone, Copy, Debug)]
enum By {
    Holder,
    Client(ClientId),
}

/// Which of the departing client's held fences (bit i for the i-th, oldest
/// first, among those that go) the broker had granted but not yet sent, as
/// it holds a grant back for kernel fences or a cache sync. Held fences
/// only: a client cannot end, or hand over, a grant it never heard of.
#[derive(Clone, Copy, Debug)]
struct NeverSent(u8);

#[derive(Clone, Debug)]
enum Op {
    Begin {
        client: ClientId,
        buffer: BufferId,
        access: Access,
        mode: Mode,
    },
    End(Target, By),
    EndKernel(Target, By),
    Signal(Target),
    Cancel(Target),
    Revoke(Target),
    ClientGone(ClientId, NeverSent),
    ReleaseBuffer(ClientId, BufferId, NeverSent),
    RemoveBuffer(BufferId),
    AddBuffer(BufferId),
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        6 => any::<usize>().prop_map(Target::Live),
        1 => (0u64..60).prop_map(Target::Raw),
    ]
}

fn by() -> impl Strategy<Value = By> {
    prop_oneof![
        6 => Just(By::Holder),
        1 => (0..CLIENTS).prop_map(By::Client),
    ]
}

fn never_sent() -> impl Strategy<Value = NeverSent> {
    // As often all sent as not, so that lost writers stay common too.
    prop_oneof![
        1 => Just(NeverSent(0)),
        1 => any::<u8>().prop_map(NeverSent),
    ]
}

fn buffer() -> impl Strategy<Value = BufferId> {
    prop_oneof![10 => prop::sample::select(&BUFFERS[..2]), 1 => Just(BUFFERS[2])]
}

fn access() -> impl Strategy<Value = Access> {
    // Reads a little more often than writes, so that runs of readers (and
    // the batches that grant them together) are common.
    prop_oneof![
        3 => Just(Access::CpuRead),
        3 => Just(Access::DeviceRead),
        2 => Just(Access::CpuWrite),
        1 => Just(Access::CpuReadWrite),
        2 => Just(Access::DeviceWrite),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let mode = prop_oneof![4 => Just(Mode::Autofence), 1 => Just(Mode::NoAutofence)];
    prop_oneof![
        20 => (0..CLIENTS, buffer(), access(), mode).prop_map(|(client, buffer, access, mode)| {
            Op::Begin { client, buffer, access, mode }
        }),
        8 => (target(), by()).prop_map(|(t, b)| Op::End(t, b)),
        4 => (target(), by()).prop_map(|(t, b)| Op::EndKernel(t, b)),
        4 => target().prop_map(Op::Signal),
        3 => target().prop_map(Op::Cancel),
        2 => target().prop_map(Op::Revoke),
        2 => (0..CLIENTS, never_sent()).prop_map(|(c, n)| Op::ClientGone(c, n)),
        1 => (0..CLIENTS, buffer(), never_sent()).prop_map(|(c, b, n)| {
            Op::ReleaseBuffer(c, b, n)
        }),
        // Rare, and undone soon after: a missing buffer makes most of what
        // follows a plain UnknownBuffer.
        1 => buffer().prop_map(Op::RemoveBuffer),
        4 => buffer().prop_map(Op::AddBuffer),
    ]
}

/// Which fences an operation is meant for, so that most calls hit a case
/// that does something rather than a refusal (refusals still come from
/// `Target::Raw`, `By::Client` and the fallback to any fence).
#[derive(Clone, Copy)]
enum Pool {
    Any,
    Held,
    HeldDevice,
    Kernel,
}

fn live_fence(m: &Model, t: Target, pool: Pool) -> (AccessId, ClientId) {
    let wanted = |f: &&MFence| match pool {
        Pool::Any => true,
        Pool::Held => !f.kernel,
        Pool::HeldDevice => !f.kernel && model_is_device(f.access),
        Pool::Kernel => f.kernel,
    };
    let mut candidates: Vec<&MFence> = m.fences.iter().filter(wanted).collect();
    if candidates.is_empty() {
        candidates = m.fences.iter().collect();
    }
    match t {
        Target::Live(i) if !candidates.is_empty() => {
            let f = candidates[i % candidates.len()];
            (f.id, f.holder)
        }
        Target::Live(i) => (i as u64 % 60, 0),
        Target::Raw(id) => (id, id % CLIENTS),
    }
}

fn live_waiter(m: &Model, t: Target) -> WaiterId {
    match t {
        Target::Live(i) if !m.queue.is_empty() => m.queue[i % m.queue.len()].id,
        Target::Live(i) => i as u64 % 60,
        Target::Raw(id) => id,
    }
}

/// The grants `never` picks among the held fences that go with `client`
/// (those on `only`, if given), with the marks each grant carried, as the
/// broker passes them. The model's record of those marks is the arbiter's:
/// every grant was compared when it was made.
fn unsent(m: &Model, client: ClientId, only: Option<BufferId>, never: NeverSent) -> Vec<Unsent> {
    m.fences
        .iter()
        .filter(|f| f.holder == client && !f.kernel && only.unwrap_or(f.buffer) == f.buffer)
        .enumerate()
        .filter(|&(i, _)| i < 8 && never.0 & (1 << i) != 0)
        .map(|(_, f)| Unsent {
            access: f.id,
            writer_lost: f.writer_lost,
            revoked: f.revoked,
        })
        .collect()
}

fn who(by: By, holder: ClientId) -> ClientId {
    match by {
        By::Holder => holder,
        By::Client(c) => c,
    }
}

/// Everything one operation returned, for comparison and for the FIFO and
/// freshness checks.
#[derive(Debug, PartialEq)]
enum Out {
    Begin(Result<BeginOutcome, FenceError>),
    Grants(Result<Vec<Grant>, FenceError>),
    Unit(Result<(), FenceError>),
    Gone(ClientGone),
    Removed((Vec<FenceView>, Vec<WaiterView>)),
    Nothing,
}

impl Out {
    fn grants(&self) -> Vec<Grant> {
        match self {
            Out::Begin(Ok(BeginOutcome::Granted(g))) => vec![g.clone()],
            Out::Grants(Ok(gs)) => gs.clone(),
            Out::Gone(g) => g.grants.clone(),
            _ => Vec::new(),
        }
    }

    fn new_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.grants().iter().map(|g| g.access_id).collect();
        if let Out::Begin(Ok(BeginOutcome::Queued(w))) = self {
            ids.push(*w);
        }
        ids
    }
}

fn apply(a: &mut Arbiter, m: &mut Model, op: &Op, now: Instant) -> (Out, Out) {
    match *op {
        Op::Begin {
            client,
            buffer,
            access,
            mode,
        } => (
            Out::Begin(a.begin(client, buffer, access, mode, now)),
            Out::Begin(m.begin(client, buffer, access, mode, now)),
        ),
        Op::End(t, b) => {
            let (id, holder) = live_fence(m, t, Pool::Held);
            let c = who(b, holder);
            (
                Out::Grants(a.end(c, id, now)),
                Out::Grants(m.end(c, id, now)),
            )
        }
        Op::EndKernel(t, b) => {
            let (id, holder) = live_fence(m, t, Pool::HeldDevice);
            let c = who(b, holder);
            (
                Out::Unit(a.end_with_kernel_fence(c, id)),
                Out::Unit(m.end_kernel(c, id)),
            )
        }
        Op::Signal(t) => {
            let (id, _) = live_fence(m, t, Pool::Kernel);
            (
                Out::Grants(Ok(a.kernel_fence_signalled(id, now))),
                Out::Grants(Ok(m.signal(id, now))),
            )
        }
        Op::Cancel(t) => {
            let id = live_waiter(m, t);
            (
                Out::Grants(a.cancel(id, now)),
                Out::Grants(m.cancel(id, now)),
            )
        }
        Op::Revoke(t) => {
            let (id, _) = live_fence(m, t, Pool::Any);
            (
                Out::Grants(a.revoke(id, now)),
                Out::Grants(m.revoke(id, now)),
            )
        }
        Op::ClientGone(c, never) => {
            let unsent = unsent(m, c, None, never);
            (
                Out::Gone(a.client_gone(c, now, &unsent)),
                Out::Gone(m.gone(c, None, &unsent, now)),
            )
        }
        Op::ReleaseBuffer(c, b, never) => {
            let unsent = unsent(m, c, Some(b), never);
            (
                Out::Gone(a.release_client_buffer(c, b, now, &unsent)),
                Out::Gone(m.gone(c, Some(b), &unsent, now)),
            )
        }
        Op::RemoveBuffer(b) => (
            Out::Removed(a.remove_buffer(b)),
            Out::Removed(m.remove_buffer(b)),
        ),
        Op::AddBuffer(b) => {
            a.add_buffer(b);
            m.add_buffer(b);
            (Out::Nothing, Out::Nothing)
        }
    }
}

/// The properties of docs/fences.md, checked on the arbiter alone.
fn check_invariants(a: &Arbiter, out: &Out) -> Result<(), TestCaseError> {
    for b in BUFFERS {
        let fences = a.fences(b);
        let waiters = a.waiters(b);
        // Safety: two conflicting fences only coexist if the later one was
        // granted without autofence. In particular, an autofence write is
        // never alongside a fence that existed when it was granted.
        for (i, f) in fences.iter().enumerate() {
            for g in &fences[i + 1..] {
                prop_assert!(f.id < g.id, "fences out of grant order: {fences:?}");
                if model_conflict(f.access, g.access) {
                    prop_assert_eq!(
                        g.mode,
                        Mode::NoAutofence,
                        "autofence {:?} granted over {:?}",
                        g,
                        f
                    );
                }
            }
        }
        // No lost wake-up: whatever heads the queue cannot be granted now.
        if let Some(head) = waiters.first() {
            prop_assert!(
                fences.iter().any(|f| model_conflict(f.access, head.access)),
                "head waiter {head:?} is grantable next to {fences:?}"
            );
        }
        // The queue stays in arrival order.
        prop_assert!(waiters.windows(2).all(|p| p[0].id < p[1].id));
    }
    // FIFO: a batch comes out in queue order, takes ids in that order, and
    // never leaves an older waiter of the same buffer behind.
    let grants = out.grants();
    let served: Vec<&Grant> = grants.iter().filter(|g| g.waiter.is_some()).collect();
    prop_assert!(served.windows(2).all(|p| p[0].waiter < p[1].waiter));
    prop_assert!(grants.windows(2).all(|p| p[0].access_id < p[1].access_id));
    for g in &served {
        let w = g.waiter.unwrap();
        prop_assert!(
            a.waiters(g.buffer).iter().all(|x| x.id > w),
            "grant {g:?} overtook an older waiter"
        );
        prop_assert!(g.outstanding.is_empty());
    }
    Ok(())
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let t0 = Instant::now();
    let mut a = Arbiter::new();
    a.add_buffer(10);
    a.add_buffer(11);
    let mut m = Model::new();
    let mut seen: HashSet<u64> = HashSet::new();
    for (step, op) in ops.iter().enumerate() {
        let now = t0 + Duration::from_millis(step as u64);
        let (real, expected) = apply(&mut a, &mut m, op, now);
        prop_assert_eq!(&real, &expected, "step {}: {:?}", step, op);
        for id in real.new_ids() {
            prop_assert!(seen.insert(id), "id {id} reused");
        }
        for b in BUFFERS {
            prop_assert_eq!(a.has_buffer(b), m.buffers.contains(&b));
            prop_assert_eq!(
                a.fences(b),
                m.fences_on(b),
                "step {}: fences of {}",
                step,
                b
            );
            prop_assert_eq!(
                a.waiters(b),
                m.waiters_on(b),
                "step {}: queue of {}",
                step,
                b
            );
        }
        for c in 0..CLIENTS {
            prop_assert_eq!(a.held_by(c), m.held_by(c));
            prop_assert_eq!(a.waiting_for(c), m.waiting_for(c));
        }
        for f in &m.fences {
            prop_assert_eq!(a.fence(f.id), Some(f.view()));
        }
        check_invariants(&a, &real)?;
    }
    Ok(())
}

proptest! {
    // At least 512 cases; PROPTEST_CASES can ask for more.
    #![proptest_config(ProptestConfig {
        cases: ProptestConfig::default().cases.max(512),
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbiter_matches_reference_model(ops in prop::collection::vec(op(), 1..150)) {
        run(&ops)?;
    }
}
