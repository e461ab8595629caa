//! Domains: an instantiated image with its contract, capabilities, queues and
//! counters, and the activation call with fuel.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use metta_proto::{abi, Contract, ContractError};
use wasmi::{
    Global, Linker, Memory, Module, Store, StoreLimitsBuilder, TypedFunc, TypedResumableCall,
    TypedResumableCallOutOfFuel, Val,
};

use crate::host::{self, Channel, HostState, MAX_CHANNELS, MAX_NAME};
use crate::image::{engine_config, global_export_name, GlobalKind, Image, LoadError, PAGE};
use crate::merkle::{memory_root, Hash};
use crate::snapshot::{ChannelSnapshot, GlobalValue, RestoreError, Snapshot, SnapshotError};
use crate::types::{Caps, DomainId, LogLine, LogOrigin, Message, Outgoing, Stats};

/// Fuel available to instantiation (data and element segment copies; no
/// domain code runs: start functions are refused at load).
const INSTANTIATE_FUEL: u64 = 1 << 40;

/// A wasm engine with the ABI host functions linked and a cache of compiled
/// images. Modules are compiled eagerly (once per image hash), so activations
/// never pay for translation.
pub struct Runtime {
    engine: wasmi::Engine,
    linker: Linker<HostState>,
    modules: BTreeMap<Hash, Module>,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("cached_modules", &self.modules.len())
            .finish_non_exhaustive()
    }
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime::new()
    }
}

impl Runtime {
    /// A runtime with fuel metering and the ABI v1 host functions.
    pub fn new() -> Runtime {
        let engine = wasmi::Engine::new(&engine_config(wasmi::CompilationMode::Eager));
        let mut linker = Linker::new(&engine);
        host::define(&mut linker).expect("ABI host functions have distinct names");
        Runtime {
            engine,
            linker,
            modules: BTreeMap::new(),
        }
    }

    fn module(&mut self, image: &Image) -> Result<Module, String> {
        if let Some(m) = self.modules.get(&image.hash()) {
            return Ok(m.clone());
        }
        let m = Module::new(&self.engine, image.code()).map_err(|e| e.to_string())?;
        self.modules.insert(image.hash(), m.clone());
        Ok(m)
    }

    /// Drops the compiled module of `hash` from the cache (domains that use
    /// it keep working).
    pub fn forget(&mut self, hash: &Hash) {
        self.modules.remove(hash);
    }

    /// Compiled modules in the cache.
    pub fn cached_modules(&self) -> usize {
        self.modules.len()
    }
}

/// Why a domain could not be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpawnError {
    /// The contract is out of range.
    Contract(ContractError),
    /// The image does not fit the contract (initial memory).
    Image(LoadError),
    /// Admission control refused the contract.
    Admission(crate::sched::AdmitError),
    /// wasmi refused the instantiation.
    Instantiate(String),
    /// The snapshot was refused.
    Restore(RestoreError),
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpawnError::Contract(e) => write!(f, "contract: {e}"),
            SpawnError::Image(e) => write!(f, "{e}"),
            SpawnError::Admission(e) => write!(f, "{e}"),
            SpawnError::Instantiate(m) => write!(f, "instantiation failed: {m}"),
            SpawnError::Restore(e) => write!(f, "{e}"),
        }
    }
}

impl core::error::Error for SpawnError {}

/// Why a message was not queued; the message comes back to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Undeliverable {
    /// The inbox holds [`abi::INBOX_DEPTH`] messages.
    Full(Message),
    /// The payload exceeds [`abi::MAX_MESSAGE`].
    TooBig(Message),
    /// The domain trapped.
    Failed(Message),
    /// No such domain.
    NoSuchDomain(Message),
}

impl Undeliverable {
    /// The message, back.
    pub fn into_message(self) -> Message {
        match self {
            Undeliverable::Full(m)
            | Undeliverable::TooBig(m)
            | Undeliverable::Failed(m)
            | Undeliverable::NoSuchDomain(m) => m,
        }
    }

    /// Why, in the words a driver notes in the sender's log: `inbox full`,
    /// `too big`, `receiver failed`, `no receiver`.
    pub fn why(&self) -> &'static str {
        match self {
            Undeliverable::Full(_) => "inbox full",
            Undeliverable::TooBig(_) => "too big",
            Undeliverable::Failed(_) => "receiver failed",
            Undeliverable::NoSuchDomain(_) => "no receiver",
        }
    }
}

/// How an activation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Returned [`abi::RUN_IDLE`]: wait for an event or the timer.
    Idle,
    /// Returned [`abi::RUN_MORE`]: runnable, call again.
    More,
    /// Ran out of fuel; the next activation resumes where it stopped.
    OutOfFuel,
    /// Trapped (or broke the ABI); the domain is failed for good.
    Trapped(String),
}

/// The result of [`Domain::activate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activation {
    /// How it ended.
    pub outcome: Outcome,
    /// Fuel consumed (including fuel credited towards an instruction that
    /// needs more than one budget, see [`Domain::activate`]).
    pub fuel_used: u64,
}

/// A running domain.
pub struct Domain {
    name: String,
    image_hash: Hash,
    contract: Contract,
    store: Store<HostState>,
    entry: TypedFunc<i32, i32>,
    memory: Memory,
    globals: Vec<(u32, GlobalKind, Global)>,
    /// A preempted activation, resumed by the next `activate`.
    pending: Option<TypedResumableCallOutOfFuel<i32>>,
    /// Fuel already charged towards the instruction `pending` waits on.
    credit: u64,
    start_pending: bool,
    /// Messages arrived since the last fresh activation.
    unseen: bool,
    /// The last activation returned `RUN_MORE`.
    more: bool,
    failed: Option<String>,
}

impl fmt::Debug for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Domain")
            .field("id", &self.id())
            .field("name", &self.name)
            .field("contract", &self.contract)
            .field("preempted", &self.pending.is_some())
            .field("failed", &self.failed)
            .field("stats", self.stats())
            .finish_non_exhaustive()
    }
}

impl Domain {
    /// Instantiates `image` as domain `id`. The first activation gets
    /// [`abi::REASON_START`].
    pub fn new(
        rt: &mut Runtime,
        id: DomainId,
        name: &str,
        image: &Image,
        contract: Contract,
        caps: Caps,
    ) -> Result<Domain, SpawnError> {
        contract.validate().map_err(SpawnError::Contract)?;
        image.check_contract(&contract).map_err(SpawnError::Image)?;
        let module = rt.module(image).map_err(SpawnError::Instantiate)?;
        let limits = StoreLimitsBuilder::new()
            .memory_size(usize::try_from(contract.memory).unwrap_or(usize::MAX))
            .trap_on_grow_failure(false)
            .build();
        let mut store = Store::new(&rt.engine, HostState::new(id, caps, limits));
        store.limiter(|st| &mut st.limits);
        let inst_err = |e: wasmi::Error| SpawnError::Instantiate(e.to_string());
        store.set_fuel(INSTANTIATE_FUEL).map_err(inst_err)?;
        let instance = rt
            .linker
            .instantiate_and_start(&mut store, &module)
            .map_err(inst_err)?;
        let missing = |what: &str| SpawnError::Instantiate(format!("export {what} vanished"));
        let memory = instance
            .get_memory(&store, abi::MEMORY)
            .ok_or_else(|| missing(abi::MEMORY))?;
        let entry = instance
            .get_typed_func::<i32, i32>(&store, abi::ACTIVATE)
            .map_err(inst_err)?;
        let mut globals = Vec::with_capacity(image.mutable_globals().len());
        for &(index, kind) in image.mutable_globals() {
            let name = global_export_name(index);
            let g = instance
                .get_global(&store, &name)
                .ok_or_else(|| missing(&name))?;
            globals.push((index, kind, g));
        }
        store.data_mut().memory = Some(memory);
        Ok(Domain {
            name: name.to_string(),
            image_hash: image.hash(),
            contract,
            store,
            entry,
            memory,
            globals,
            pending: None,
            credit: 0,
            start_pending: true,
            unseen: false,
            more: false,
            failed: None,
        })
    }

    /// Re-creates a domain from `snapshot`: instantiates `image`, checks the
    /// memory against its Merkle root, writes memory, globals, queues and
    /// timer back. The first activation gets [`abi::REASON_START`].
    pub fn restore(
        rt: &mut Runtime,
        id: DomainId,
        name: &str,
        image: &Image,
        snapshot: Snapshot,
    ) -> Result<Domain, RestoreError> {
        let s = snapshot;
        if s.image_hash != image.hash() {
            return Err(RestoreError::ImageMismatch);
        }
        if memory_root(&s.memory) != s.memory_root {
            return Err(RestoreError::MemoryRoot);
        }
        let len = s.memory.len() as u64;
        let size_err = |why| RestoreError::MemorySize { len, why };
        if !len.is_multiple_of(PAGE) {
            return Err(size_err("is not a whole number of pages"));
        }
        if len > s.contract.memory {
            return Err(size_err("exceeds the contract"));
        }
        if len < image.memory_initial() {
            return Err(size_err("is smaller than the module's initial memory"));
        }
        check_queues(&s)?;
        let expected: Vec<(u32, GlobalKind)> = image.mutable_globals().to_vec();
        let found: Vec<(u32, Option<GlobalKind>)> = s
            .globals
            .iter()
            .map(|(i, v)| (*i, Some(kind_of(v))))
            .collect();
        if found
            != expected
                .iter()
                .map(|(i, k)| (*i, Some(*k)))
                .collect::<Vec<_>>()
        {
            return Err(RestoreError::Globals(format!(
                "image has mutable globals {expected:?}, snapshot {found:?}"
            )));
        }

        let mut d = match Domain::new(rt, id, name, image, s.contract, s.caps) {
            Ok(d) => d,
            Err(SpawnError::Contract(e)) => return Err(RestoreError::Contract(e)),
            Err(SpawnError::Image(e)) => return Err(RestoreError::Image(e)),
            Err(e) => return Err(RestoreError::Instantiate(e.to_string())),
        };
        let current = d.memory.data(&d.store).len() as u64;
        if len > current {
            d.memory
                .grow(&mut d.store, (len - current) / PAGE)
                .map_err(|e| RestoreError::Instantiate(format!("memory.grow: {e}")))?;
        }
        d.memory.data_mut(&mut d.store).copy_from_slice(&s.memory);
        for ((_, _, g), (_, v)) in d.globals.iter().zip(&s.globals) {
            g.set(&mut d.store, to_val(*v))
                .map_err(|e| RestoreError::Globals(e.to_string()))?;
        }
        let st = d.store.data_mut();
        st.inbox = s.inbox.into();
        let slots = s
            .channels
            .iter()
            .map(|c| c.handle as usize + 1)
            .max()
            .unwrap_or(0);
        st.channels = alloc::vec![None; slots];
        for c in s.channels {
            st.channels[c.handle as usize] = Some(Channel {
                name: c.name,
                reply: c.reply,
                last_reply: c.last_reply,
            });
        }
        st.timer = s.timer;
        d.unseen = !st.inbox.is_empty();
        Ok(d)
    }

    /// The domain's id.
    pub fn id(&self) -> DomainId {
        self.store.data().id
    }

    /// The name it was spawned with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its contract.
    pub fn contract(&self) -> &Contract {
        &self.contract
    }

    /// Its capabilities.
    pub fn caps(&self) -> &Caps {
        &self.store.data().caps
    }

    /// blake3 of its image.
    pub fn image_hash(&self) -> Hash {
        self.image_hash
    }

    /// Its counters.
    pub fn stats(&self) -> &Stats {
        &self.store.data().stats
    }

    /// `Some(reason)` once the domain trapped.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Whether no activation is suspended (snapshots need this).
    pub fn at_boundary(&self) -> bool {
        self.pending.is_none()
    }

    /// The domain's linear memory (read-only view, for tests and tools).
    pub fn memory(&self) -> &[u8] {
        self.memory.data(&self.store)
    }

    /// The pending timer deadline.
    pub fn timer(&self) -> Option<u64> {
        self.store.data().timer
    }

    /// Messages waiting in the inbox.
    pub fn inbox_len(&self) -> usize {
        self.store.data().inbox.len()
    }

    /// Queues an inbound message.
    pub fn deliver(&mut self, msg: Message) -> Result<(), Undeliverable> {
        if self.failed.is_some() {
            return Err(Undeliverable::Failed(msg));
        }
        if msg.payload.len() > abi::MAX_MESSAGE {
            return Err(Undeliverable::TooBig(msg));
        }
        let st = self.store.data_mut();
        if st.inbox.len() >= abi::INBOX_DEPTH {
            return Err(Undeliverable::Full(msg));
        }
        st.inbox.push_back(msg);
        self.unseen = true;
        Ok(())
    }

    /// Messages sent since the last call, for the driver to route.
    pub fn take_outbox(&mut self) -> Vec<Outgoing> {
        let st = self.store.data_mut();
        st.outbox_bytes = 0;
        core::mem::take(&mut st.outbox)
    }

    /// Log lines since the last call.
    pub fn take_logs(&mut self) -> Vec<LogLine> {
        self.store.data_mut().logs.drain(..).collect()
    }

    /// The reason the next activation should carry, or `None` if the domain
    /// has nothing to do at `now`. Priority: a preempted activation
    /// (resumed; the reason is ignored), start, timer, events, continue.
    pub fn wants(&self, now: u64) -> Option<i32> {
        if self.failed.is_some() {
            None
        } else if self.pending.is_some() {
            Some(abi::REASON_CONTINUE)
        } else if self.start_pending {
            Some(abi::REASON_START)
        } else if self.store.data().timer.is_some_and(|t| t <= now) {
            Some(abi::REASON_TIMER)
        } else if self.unseen {
            Some(abi::REASON_EVENTS)
        } else if self.more {
            Some(abi::REASON_CONTINUE)
        } else {
            None
        }
    }

    /// Runs one activation with at most `fuel` units of fuel.
    ///
    /// A fresh activation calls `metta_activate(reason)`; if the previous one
    /// ran out of fuel it is **resumed** instead (wasmi's resumable calls:
    /// the suspended wasm stack is kept in the domain) and `reason` is
    /// ignored. If the instruction a preempted activation waits on needs more
    /// fuel than one budget (a large `memory.fill`, say), budgets are
    /// credited until it fits, so no domain can stall forever on one
    /// instruction. A trap, or a return value other than `RUN_IDLE` /
    /// `RUN_MORE`, fails the domain for good.
    pub fn activate(&mut self, now: u64, reason: i32, fuel: u64) -> Activation {
        if let Some(r) = &self.failed {
            return Activation {
                outcome: Outcome::Trapped(r.clone()),
                fuel_used: 0,
            };
        }
        {
            let st = self.store.data_mut();
            st.now = st.now.max(now);
            st.stats.activations += 1;
        }
        let credit = self.credit;
        let total = fuel.saturating_add(credit);
        let result = match self.pending.take() {
            Some(call) if call.required_fuel() > total => {
                self.credit = total;
                self.pending = Some(call);
                let st = self.store.data_mut();
                st.stats.preemptions += 1;
                st.stats.fuel_used += fuel;
                return Activation {
                    outcome: Outcome::OutOfFuel,
                    fuel_used: fuel,
                };
            }
            Some(call) => {
                self.set_fuel(total);
                call.resume(&mut self.store)
            }
            None => {
                self.start_pending = false;
                self.unseen = false;
                self.more = false;
                let st = self.store.data_mut();
                if st.timer.is_some_and(|t| t <= st.now) {
                    st.timer = None;
                }
                self.set_fuel(total);
                self.entry.call_resumable(&mut self.store, reason)
            }
        };
        let remaining = self.store.get_fuel().unwrap_or(0);
        let fuel_used = total.saturating_sub(remaining).saturating_sub(credit);
        self.credit = 0;
        self.store.data_mut().stats.fuel_used += fuel_used;
        let outcome = match result {
            Ok(TypedResumableCall::Finished(abi::RUN_IDLE)) => Outcome::Idle,
            Ok(TypedResumableCall::Finished(abi::RUN_MORE)) => {
                self.more = true;
                Outcome::More
            }
            Ok(TypedResumableCall::Finished(other)) => self.fail(format!(
                "metta_activate returned {other}; expected RUN_IDLE (0) or RUN_MORE (1)"
            )),
            Ok(TypedResumableCall::OutOfFuel(call)) => {
                self.pending = Some(call);
                self.store.data_mut().stats.preemptions += 1;
                Outcome::OutOfFuel
            }
            // Host functions never return errors; treat one as a failure.
            Ok(TypedResumableCall::HostTrap(call)) => {
                self.fail(format!("host error: {}", call.host_error()))
            }
            Err(e) => self.fail(e.to_string()),
        };
        Activation { outcome, fuel_used }
    }

    fn set_fuel(&mut self, fuel: u64) {
        // Cannot fail: the runtime's engine meters fuel.
        let _ = self.store.set_fuel(fuel);
    }

    fn fail(&mut self, reason: String) -> Outcome {
        self.pending = None;
        let st = self.store.data_mut();
        st.stats.traps += 1;
        st.log(LogOrigin::Nucleus, format!("trapped: {reason}"));
        self.failed = Some(reason.clone());
        Outcome::Trapped(reason)
    }

    pub(crate) fn add_cpu(&mut self, ns: u64) {
        self.store.data_mut().stats.cpu_ns += ns;
    }

    /// Captures the domain's state. Only at an activation boundary, with the
    /// outbox drained, and not after a trap.
    pub fn snapshot(&self) -> Result<Snapshot, SnapshotError> {
        if let Some(r) = &self.failed {
            return Err(SnapshotError::Failed(r.clone()));
        }
        if self.pending.is_some() {
            return Err(SnapshotError::MidActivation);
        }
        let st = self.store.data();
        if !st.outbox.is_empty() {
            return Err(SnapshotError::OutboxNotDrained);
        }
        let memory = self.memory.data(&self.store).to_vec();
        let memory_root = memory_root(&memory);
        let globals = self
            .globals
            .iter()
            .map(|(i, _, g)| (*i, from_val(&g.get(&self.store))))
            .collect();
        let channels = st
            .channels
            .iter()
            .enumerate()
            .filter_map(|(h, c)| {
                c.as_ref().map(|c| ChannelSnapshot {
                    handle: h as u32,
                    name: c.name.clone(),
                    reply: c.reply,
                    last_reply: c.last_reply,
                })
            })
            .collect();
        Ok(Snapshot {
            image_hash: self.image_hash,
            contract: self.contract,
            caps: st.caps.clone(),
            memory,
            globals,
            inbox: st.inbox.iter().cloned().collect(),
            channels,
            timer: st.timer,
            memory_root,
        })
    }
}

fn check_queues(s: &Snapshot) -> Result<(), RestoreError> {
    let bad = |m: String| Err(RestoreError::Queues(m));
    if s.inbox.len() > abi::INBOX_DEPTH {
        return bad(format!("{} queued messages", s.inbox.len()));
    }
    if s.inbox.iter().any(|m| m.payload.len() > abi::MAX_MESSAGE) {
        return bad("a message exceeds MAX_MESSAGE".to_string());
    }
    let mut seen = alloc::collections::BTreeSet::new();
    for c in &s.channels {
        if c.handle as usize >= MAX_CHANNELS || !seen.insert(c.handle) {
            return bad(format!("bad or duplicate handle {}", c.handle));
        }
        if c.name.len() > MAX_NAME || !c.name.starts_with('/') {
            return bad(format!("bad channel name {:?}", c.name));
        }
    }
    Ok(())
}

fn kind_of(v: &GlobalValue) -> GlobalKind {
    match v {
        GlobalValue::I32(_) => GlobalKind::I32,
        GlobalValue::I64(_) => GlobalKind::I64,
        GlobalValue::F32(_) => GlobalKind::F32,
        GlobalValue::F64(_) => GlobalKind::F64,
    }
}

fn from_val(v: &Val) -> GlobalValue {
    match v {
        Val::I32(x) => GlobalValue::I32(*x),
        Val::I64(x) => GlobalValue::I64(*x),
        Val::F32(x) => GlobalValue::F32(x.to_bits()),
        Val::F64(x) => GlobalValue::F64(x.to_bits()),
        // Load refuses mutable globals of other types.
        other => unreachable!("mutable global of unsupported type {other:?}"),
    }
}

fn to_val(v: GlobalValue) -> Val {
    match v {
        GlobalValue::I32(x) => Val::I32(x),
        GlobalValue::I64(x) => Val::I64(x),
        GlobalValue::F32(x) => Val::F32(wasmi::F32::from_bits(x)),
        GlobalValue::F64(x) => Val::F64(wasmi::F64::from_bits(x)),
    }
}
