//! The native node's link to the control plane: join with the token from the
//! command line, then sync — report the domains, take the work the control
//! plane has for them — over TLS 1.3 on a smoltcp TCP socket, while the
//! domains run.
//!
//! This is the driver around pure pieces: the sans-IO TLS session and
//! requests of `metta-link` (`Session`, `join_request`, `renew_request`),
//! the retry policy of [`metta_kernel::linkpolicy`] (backoff; which failures
//! are retried and which end the boot with which exit code; when to renew
//! the certificate), and the placed domains of [`metta_kernel::node`] (what
//! a sync carries, what its answer means). The driver owns what they leave
//! out:
//!
//! - **Entropy** ([`Identity::create`]): the random pool of `metta-link` is
//!   seeded from RDSEED/RDRAND ([`entropy::fill`]) and the node's ECDSA P-256
//!   key is made from a second draw, before the network comes up; a CPU
//!   without either instruction stops the boot here ([`ExitCode::NoEntropy`])
//!   instead of joining with a predictable key. Every session mixes in 32
//!   fresh bytes. The key and the certificate stay in memory (there is no
//!   disk).
//! - **Time**: the wall clock is the CMOS RTC read once, advanced by the TSC
//!   ([`Clock`]); sessions check certificates against it.
//! - **Bytes**: one TCP connection at a time on the DHCP-configured
//!   interface ([`Net`]); [`Conn::pump`] moves bytes between the socket and
//!   the session. Between polls the link waits through an [`Idle`]: before
//!   the join it halts until the next timer tick (1 ms: the NIC's interrupts
//!   are not used); once domains run, each wait runs them for about a
//!   millisecond ([`native::Runner`]), so they keep running — on their EDF
//!   schedule — while the link connects, waits for an answer or backs off.
//!   Every wait has a deadline: [`CONNECT_TIMEOUT_MS`] for the TCP
//!   connection, [`JOIN_TIMEOUT_MS`] for the handshake and the join answer,
//!   [`SYNC_TIMEOUT_MS`] for a sync's (extended while bytes arrive: work
//!   can carry modules).
//!
//! # What it does
//!
//! 1. **Join**: connect to `metta.ctl`, open a session *pinned* to the CA in
//!    the token, send the join request (token credential, CSR, name,
//!    `<lease address>:0` as the address — a native node accepts no
//!    connections — and the hardware: 1 CPU, since only the boot CPU
//!    runs, and the usable RAM of the multiboot memory map). Prints
//!    `joined cluster <c> as node/<id> in <ms> ms (certificate until
//!    <date>)`, the milliseconds counted from kernel entry, and how the join
//!    split (DHCP, key and CSR, TCP connect, TLS handshake, request to
//!    answer).
//! 2. **Ready to serve**: calibrates the fuel rate on the TSC (after the
//!    join, which is a benchmark of its own) and prints it; after the first
//!    sync, the idle kernel's memory (`memory: image ..., total <KiB>`:
//!    joined, connected, no domains yet).
//! 3. **Syncs**: a member session with the issued certificate carries one
//!    `Request::Sync` after another: the heartbeat (hardware, certificate
//!    expiry), every placed domain's state, its domains' outbound
//!    messages, answers and log lines, runtime rows when asked for, and
//!    [`SYNC_HOLD_MS`]: with nothing to do the control plane holds the
//!    answer that long, so work arrives as soon as it exists. The answer
//!    ([`NodeWork`]) is carried out at once (stop, start, deliver, answers);
//!    after a start the next sync waits (up to [`SETTLE_MS`]) for the first
//!    activation, so `mettactl run` hears of it without a hold in between.
//!    Acknowledged syncs are the heartbeats the control plane counts:
//!    `link: heartbeat <n> acknowledged` for the first and every 10th; with
//!    `metta.heartbeats=<n>` it exits with the success code after `n`, else
//!    it runs until stopped.
//! 4. **Renewal**: at two thirds of the certificate's lifetime (as received)
//!    the member session asks for a new one for the same key
//!    (`ApiRequest::Renew`), checks it like the join's, and goes on on a new
//!    connection with it (`link: certificate renewed until <date>;
//!    reconnecting with it`: the server would cut the old one when the old
//!    certificate expires); a refusal is retried 30 s later.
//! 5. **Failures** (the policy's verdicts): an unreachable control plane is
//!    retried with backoff (`link: cannot reach <addr>: <why>; retrying in
//!    <n> s`, 0.5 s doubling to 8 s), a lost connection is re-established the
//!    same way (`link: lost the connection ...`, then `link: reconnected ...`
//!    once a sync is acknowledged again); a sync that got no answer is sent
//!    again with the same batch and batch number (`NodeSync::seq`; what came
//!    since waits for the next), so no message, answer or log line is lost
//!    with a connection, and the control node takes none twice. The wrong cluster, a
//!    rejected token or a refused node print why and exit with their own
//!    codes.
//!
//! The token's secret is never printed: only its id.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use metta_kernel::bootcfg::{CtlAddr, JoinConfig};
use metta_kernel::driver::Driver;
use metta_kernel::exit::ExitCode;
use metta_kernel::linkpolicy::{
    after_failure, after_join, after_renew, after_sync, AttemptError, Backoff, Failure, IoError,
    Renewal, Seconds, Verdict, RENEW_RETRY_SECS,
};
use metta_kernel::multiboot::Bytes;
use metta_kernel::node::Node;
use metta_kernel::rtc::DateTime;
use metta_link::{join_request, renew_request, rng, Joined, LinkConfig, NodeKey, Session};
use metta_proto::{Heartbeat, NodeResources, Request, Response, MAX_FRAME_LEN};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::State;
use smoltcp::wire::Ipv4Address;

use crate::native::{self, Runner};
use crate::net::Net;
use crate::{cmos, entropy, kprintln, memstat, timer};

/// How long a TCP connection may take to be established.
pub const CONNECT_TIMEOUT_MS: u64 = 3_000;
/// How long the TLS handshake and the join answer may take.
pub const JOIN_TIMEOUT_MS: u64 = 10_000;
/// How long the control plane may hold a sync's answer when it has no work.
pub const SYNC_HOLD_MS: u32 = 500;
/// How long a sync's answer may take (including a member handshake and the
/// hold); bytes arriving extend it.
pub const SYNC_TIMEOUT_MS: u64 = SYNC_HOLD_MS as u64 + 5_000;
/// How long a renewal's answer may take.
pub const RENEW_TIMEOUT_MS: u64 = 5_000;
/// After work with starts, the next sync waits this long at most for the
/// new domains' first activations, so `run` learns of them without waiting
/// out a hold on the control node.
pub const SETTLE_MS: u64 = 100;
/// After work with messages or answers, the next sync waits this long at
/// most for the domains to finish with them (until every domain waits), so
/// their answers and follow-ups go with it.
pub const SETTLE_MESSAGES_MS: u64 = 20;
/// Acknowledged syncs (heartbeats) are logged: the first, then every this many.
const HEARTBEAT_LOG_EVERY: u64 = 10;
/// Bytes read from the socket per call.
const READ_CHUNK: usize = 16 * 1024;

const MS: u64 = 1_000_000;

/// Milliseconds since kernel entry.
fn now_ms() -> u64 {
    timer::now_ns() / MS
}

/// Halts until the next timer tick (or 1 ms, if the tick does not run).
fn wait_tick() {
    let (tick, start) = (timer::ticks(), timer::now_ns());
    timer::idle_until(|| timer::ticks() != tick || timer::now_ns() >= start + MS);
}

/// What the link does between polls of the network: waits about a
/// millisecond, or until the next timer tick.
pub trait Idle {
    /// One wait.
    fn wait(&mut self);
}

/// Before the join: nothing else runs; halt.
struct Halt;

impl Idle for Halt {
    fn wait(&mut self) {
        wait_tick();
    }
}

/// Once joined: the domains run meanwhile.
impl Idle for Runner {
    fn wait(&mut self) {
        Runner::wait(self);
    }
}

/// Keeps the network polled for `ms` milliseconds.
fn sleep_polling(net: &mut Net, ms: u64, idle: &mut dyn Idle) {
    let end = timer::now_ns() + ms * MS;
    while timer::now_ns() < end {
        net.poll();
        idle.wait();
    }
}

/// The wall clock: the RTC read once, advanced by the TSC.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    unix_at_read: u64,
    ns_at_read: u64,
}

impl Clock {
    /// Reads the RTC.
    pub fn read() -> Result<Clock, metta_kernel::rtc::RtcError> {
        let t = cmos::read()?;
        Ok(Clock {
            unix_at_read: t.unix_seconds().max(0) as u64,
            ns_at_read: timer::now_ns(),
        })
    }

    /// Unix seconds now.
    pub fn unix(&self) -> u64 {
        self.unix_at_read + (timer::now_ns() - self.ns_at_read) / 1_000_000_000
    }
}

/// 32 fresh bytes from the hardware, or the exit that says there are none.
fn fresh32() -> Result<[u8; 32], ExitCode> {
    let mut b = [0u8; 32];
    entropy::fill(&mut b).map_err(|e| {
        kprintln!("link: entropy failed: {e}; cannot continue without fresh randomness");
        ExitCode::NoEntropy
    })?;
    Ok(b)
}

/// The node's key, made at boot from hardware entropy.
#[derive(Debug)]
pub struct Identity {
    key: NodeKey,
    /// How long seeding and key generation took, ns.
    took_ns: u64,
}

impl Identity {
    /// Seeds the TLS random pool and makes the node key from RDSEED/RDRAND.
    /// Without hardware entropy it says so and returns
    /// [`ExitCode::NoEntropy`].
    pub fn create() -> Result<Identity, ExitCode> {
        let start = timer::now_ns();
        let features = entropy::features();
        let mut seed = [0u8; 64];
        if let Err(e) = entropy::fill(&mut seed) {
            kprintln!(
                "link: cannot create a node key: no hardware entropy ({e}); \
                 refusing to join with a predictable key (boot with a CPU that has RDSEED or RDRAND, e.g. QEMU -cpu max)"
            );
            return Err(ExitCode::NoEntropy);
        }
        rng::add_entropy(&seed[..32]);
        let key = NodeKey::from_entropy(&seed[32..]);
        seed.fill(0);
        let key = key.map_err(|e| {
            kprintln!("link: cannot create a node key: {e}");
            ExitCode::NoEntropy
        })?;
        let took_ns = timer::now_ns() - start;
        kprintln!(
            "link: node key ECDSA P-256 from {features} in {} us (in memory only)",
            took_ns / 1_000
        );
        Ok(Identity { key, took_ns })
    }
}

/// What the node tells the cluster about itself.
#[derive(Debug)]
pub struct NodeInfo {
    /// Its name.
    pub name: String,
    /// CPUs, memory, architecture.
    pub resources: NodeResources,
    /// When the DHCP lease came, ns since entry.
    pub lease_ns: u64,
}

/// A TCP connection carrying a TLS session.
struct Conn {
    h: SocketHandle,
    session: Session,
    /// TLS bytes the socket has not taken yet.
    out: Vec<u8>,
    buf: Vec<u8>,
    /// Bytes received so far.
    received: u64,
}

/// Opens a TCP connection to `ctl`.
fn connect(net: &mut Net, ctl: CtlAddr, idle: &mut dyn Idle) -> Result<SocketHandle, IoError> {
    let mut r = [0u8; 2];
    // The port needs no secrecy; the TSC will do if entropy fails.
    let r = match entropy::fill(&mut r) {
        Ok(()) => u16::from_le_bytes(r),
        Err(_) => crate::tsc::rdtsc() as u16,
    };
    let local_port = 49_152 + r % 16_384;
    let [a, b, c, d] = ctl.ip;
    let h = net
        .tcp_connect((Ipv4Address::new(a, b, c, d), ctl.port), local_port)
        .map_err(|_| IoError::Unaddressable)?;
    let deadline = now_ms() + CONNECT_TIMEOUT_MS;
    loop {
        net.poll();
        match net.tcp(h).state() {
            State::Established => return Ok(h),
            State::Closed => {
                net.remove(h);
                return Err(IoError::Refused);
            }
            _ => {}
        }
        if now_ms() >= deadline {
            net.tcp(h).abort();
            net.poll();
            net.remove(h);
            return Err(IoError::Timeout {
                what: "TCP connection",
                ms: CONNECT_TIMEOUT_MS,
            });
        }
        idle.wait();
    }
}

impl Conn {
    /// A TLS session with `config` on a new connection to `ctl`; the time
    /// the TCP connection took (ns) in `tcp_ns`.
    fn open(
        net: &mut Net,
        ctl: CtlAddr,
        config: &LinkConfig,
        now: u64,
        tcp_ns: &mut u64,
        idle: &mut dyn Idle,
    ) -> Result<Conn, Fault> {
        let entropy = fresh32().map_err(Fault::Exit)?;
        let t = timer::now_ns();
        let h = connect(net, ctl, idle).map_err(|e| Fault::Connect(e.into()))?;
        *tcp_ns = timer::now_ns() - t;
        match Session::new(config, now, &entropy) {
            Ok(session) => Ok(Conn {
                h,
                session,
                out: Vec::new(),
                buf: alloc::vec![0; READ_CHUNK],
                received: 0,
            }),
            Err(e) => {
                net.tcp(h).abort();
                net.poll();
                net.remove(h);
                Err(Fault::Exchange(e.into()))
            }
        }
    }

    /// Moves bytes once in each direction between the socket and the
    /// session. Returns whether the connection is still open for reading
    /// (false: the server closed or reset it; what arrived before that has
    /// been fed to the session).
    fn pump(&mut self, net: &mut Net) -> Result<bool, AttemptError> {
        self.out.extend(self.session.take_transmit());
        self.flush(net);
        net.poll();
        let sock = net.tcp(self.h);
        while sock.can_recv() {
            match sock.recv_slice(&mut self.buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    self.received += n as u64;
                    self.session.receive(&self.buf[..n])?;
                }
            }
        }
        let open = sock.may_recv();
        let reset = sock.state() == State::Closed;
        self.out.extend(self.session.take_transmit());
        self.flush(net);
        if !open && reset && !self.session.awaiting() {
            return Err(IoError::Reset.into());
        }
        Ok(open)
    }

    /// Hands queued TLS bytes to the socket (as much as it takes).
    fn flush(&mut self, net: &mut Net) {
        if self.out.is_empty() {
            return;
        }
        let sock = net.tcp(self.h);
        if sock.may_send() {
            if let Ok(n) = sock.send_slice(&self.out) {
                self.out.drain(..n);
            }
        }
        net.poll();
    }

    /// One request and its answer, within `timeout_ms` (from the request,
    /// or from the last bytes received). `on_established` runs once, when
    /// the handshake has finished.
    fn exchange(
        &mut self,
        net: &mut Net,
        req: &Request,
        timeout_ms: u64,
        mut on_established: impl FnMut(),
        idle: &mut dyn Idle,
    ) -> Result<Response, AttemptError> {
        let mut established = !self.session.is_handshaking();
        self.session.send_frame(req)?;
        let mut deadline = now_ms() + timeout_ms;
        loop {
            let before = self.received;
            let open = self.pump(net)?;
            if self.received != before {
                deadline = deadline.max(now_ms() + timeout_ms);
            }
            if !established && !self.session.is_handshaking() {
                established = true;
                on_established();
            }
            if let Some(r) = self.session.poll_response()? {
                return Ok(r);
            }
            if !open {
                self.session.connection_closed()?;
                return Err(IoError::Reset.into());
            }
            if now_ms() >= deadline {
                return Err(IoError::Timeout {
                    what: if established {
                        "answer"
                    } else {
                        "TLS handshake"
                    },
                    ms: timeout_ms,
                }
                .into());
            }
            idle.wait();
        }
    }

    /// Ends the session politely (close_notify, FIN) and drops the socket.
    fn close(mut self, net: &mut Net, idle: &mut dyn Idle) {
        self.session.close();
        self.out.extend(self.session.take_transmit());
        self.flush(net);
        net.tcp(self.h).close();
        for _ in 0..5 {
            net.poll();
            if matches!(
                net.tcp(self.h).state(),
                State::Closed | State::TimeWait | State::FinWait2
            ) {
                break;
            }
            idle.wait();
        }
        net.remove(self.h);
    }

    /// Drops the connection with a reset.
    fn abort(mut self, net: &mut Net) {
        self.out.extend(self.session.take_transmit());
        self.flush(net);
        net.tcp(self.h).abort();
        net.poll();
        net.remove(self.h);
    }
}

/// Why an attempt did not produce an answer.
enum Fault {
    /// The TCP connection could not be made.
    Connect(AttemptError),
    /// The connection was made; the session or the exchange failed.
    Exchange(AttemptError),
    /// Stop with this code (already explained on the console).
    Exit(ExitCode),
}

/// How one join attempt went, ns.
#[derive(Clone, Copy, Debug, Default)]
struct JoinTimes {
    /// The TCP connection.
    tcp: u64,
    /// The session (rustls config, key share, ClientHello).
    hello: u64,
    /// From the ClientHello sent to the handshake done (the server's
    /// flight, verifying it, our Finished).
    handshake: u64,
    /// From the handshake done to the join answer (the request on the
    /// wire, the control plane's work, the answer).
    answer: u64,
}

/// One join attempt: connect, pinned handshake, request, answer.
fn join_once(
    net: &mut Net,
    ctl: CtlAddr,
    config: &LinkConfig,
    req: &Request,
    clock: &Clock,
    times: &mut JoinTimes,
) -> Result<Response, Fault> {
    let t0 = timer::now_ns();
    let mut conn = Conn::open(net, ctl, config, clock.unix(), &mut times.tcp, &mut Halt)?;
    let t1 = timer::now_ns();
    times.hello = (t1 - t0).saturating_sub(times.tcp);
    let mut t2 = t1;
    let r = conn.exchange(
        net,
        req,
        JOIN_TIMEOUT_MS,
        || t2 = timer::now_ns(),
        &mut Halt,
    );
    let t3 = timer::now_ns();
    times.handshake = t2 - t1;
    times.answer = t3 - t2;
    match r {
        Ok(resp) => {
            conn.close(net, &mut Halt);
            Ok(resp)
        }
        Err(e) => {
            conn.abort(net);
            Err(Fault::Exchange(e))
        }
    }
}

/// Nanoseconds shown as milliseconds with one decimal.
struct Millis(u64);

impl core::fmt::Display for Millis {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{}", self.0 / MS, self.0 % MS / (MS / 10))
    }
}

/// Prints a retry line and waits the backoff.
fn retry(
    net: &mut Net,
    backoff: &mut Backoff,
    what: core::fmt::Arguments<'_>,
    why: &str,
    idle: &mut dyn Idle,
) {
    let wait = backoff.fail();
    kprintln!("link: {what}: {why}; retrying in {}", Seconds(wait));
    sleep_polling(net, wait, idle);
}

/// Joins the cluster, then syncs and runs the domains placed here (see the
/// module docs). Returns the exit code: success after `metta.heartbeats`
/// acknowledged syncs, else the failure's.
pub fn run(net: &mut Net, cfg: &JoinConfig<'_>, id: Identity, node: &NodeInfo) -> ExitCode {
    let clock = match Clock::read() {
        Ok(c) => c,
        Err(e) => {
            kprintln!("link: no wall clock ({e}): cannot check certificates; not joining");
            return ExitCode::LinkRefused;
        }
    };
    let token = match cfg.token.token() {
        Ok(t) => t,
        Err(e) => {
            kprintln!("link: {e}");
            return ExitCode::BootFailure;
        }
    };
    let ctl = cfg.ctl;
    let addr = format!("{}:0", net.lease().address.address());
    let t_csr = timer::now_ns();
    let req = match join_request(&token, &id.key, &node.name, &addr, node.resources.clone()) {
        Ok(r) => r,
        Err(e) => {
            kprintln!("link: cannot make the join request: {e}");
            return ExitCode::LinkRefused;
        }
    };
    let csr_ns = timer::now_ns() - t_csr;
    kprintln!(
        "link: joining {ctl} as {} with token {} (cpus {}, memory {} bytes, address {addr})",
        node.name,
        token.id,
        node.resources.cpus,
        node.resources.memory_bytes
    );
    let config = LinkConfig::join(token.pin);
    let mut backoff = Backoff::new();
    let mut times = JoinTimes::default();
    let joined: Joined = loop {
        let answer = match join_once(net, ctl, &config, &req, &clock, &mut times) {
            Ok(r) => Ok(r),
            Err(Fault::Exit(code)) => return code,
            Err(Fault::Connect(e)) => match after_failure(e, true) {
                Failure::Retry(why) => {
                    retry(
                        net,
                        &mut backoff,
                        format_args!("cannot reach {ctl}"),
                        &why,
                        &mut Halt,
                    );
                    continue;
                }
                Failure::Fatal { code, message } => {
                    kprintln!("{message}");
                    return code;
                }
            },
            Err(Fault::Exchange(e)) => Err(e),
        };
        match after_join(answer, &token, &id.key, clock.unix()) {
            Verdict::Done(j) => break j,
            Verdict::Retry(why) => {
                retry(
                    net,
                    &mut backoff,
                    format_args!("join via {ctl} failed"),
                    &why,
                    &mut Halt,
                );
            }
            Verdict::Fatal { code, message } => {
                kprintln!("{message}");
                return code;
            }
        }
    };
    let joined_ms = now_ms();
    kprintln!(
        "joined cluster {} as node/{} in {joined_ms} ms (certificate until {})",
        joined.cluster,
        joined.node_id,
        DateTime::from_unix(joined.cert_not_after.min(i64::MAX as u64) as i64)
    );
    let ms = |ns: u64| Millis(ns);
    kprintln!(
        "link: join timing: dhcp lease at {} ms; key {} + CSR {} ms; \
         tcp connect {} ms; ClientHello {} ms; TLS handshake {} ms; \
         request to answer {} ms (the last of {} attempts)",
        ms(node.lease_ns),
        ms(id.took_ns),
        ms(csr_ns),
        ms(times.tcp),
        ms(times.hello),
        ms(times.handshake),
        ms(times.answer),
        backoff.failures() + 1
    );
    let joined_at = clock.unix();
    let Some(runner) = ready(joined.node_id) else {
        return ExitCode::BootFailure;
    };
    let member = Member {
        ctl,
        renewal: Renewal::new(joined_at, joined.cert_not_after),
        config: member_config(&joined, id.key.clone()),
        joined,
        key: id.key,
        resources: node.resources.clone(),
        addr,
        heartbeats: cfg.heartbeats,
    };
    member.run(net, runner, &clock)
}

/// A member session's config: the cluster's servers, our certificate, and
/// answers up to the frame limit (work can carry modules of megabytes).
fn member_config(joined: &Joined, key: NodeKey) -> LinkConfig {
    let mut c = joined.link_config(key);
    c.max_response_len = MAX_FRAME_LEN;
    c
}

/// After the join: calibrates the fuel rate, prints it, and makes the
/// domains' runner. `None` (said why) if the nucleus cannot run.
fn ready(node_id: metta_proto::NodeId) -> Option<Runner> {
    let t = timer::now_ns();
    let cal = match native::calibrate() {
        Ok(c) => c,
        Err(e) => {
            kprintln!("node: cannot calibrate the fuel rate: {e}; cannot run domains");
            return None;
        }
    };
    kprintln!(
        "node: fuel rate {} fuel/ms by the TSC: median of {} runs of {} fuel ({:?}) in {} ms; \
         domains may have {}% of the CPU",
        cal.per_scale,
        native::CALIBRATION_RUNS,
        cal.fuel,
        cal.runs,
        (timer::now_ns() - t) / MS,
        native::SERVED.capacity_ppm / 10_000
    );
    Some(Runner::new(Node::new(
        Driver::new(native::SERVED, cal.rate),
        node_id,
    )))
}

/// The member phase (see the module docs).
struct Member {
    ctl: CtlAddr,
    joined: Joined,
    key: NodeKey,
    /// The session config for new connections (renewal replaces it).
    config: LinkConfig,
    renewal: Renewal,
    resources: NodeResources,
    addr: String,
    heartbeats: Option<u64>,
}

/// How a connection ended.
enum Ended {
    /// The certificate was renewed: continue on a new connection with it
    /// (the server would close this one when the old one expires).
    Renewed,
    /// It failed in a way time can mend: reconnect after the backoff.
    Lost(String),
    /// Stop with this code (already explained on the console).
    Exit(ExitCode),
}

impl Member {
    fn heartbeat(&self) -> Heartbeat {
        Heartbeat {
            resources: self.resources.clone(),
            cert_not_after: self.joined.cert_not_after,
            addr: self.addr.clone(),
        }
    }

    /// Syncs on one connection after another, reconnecting with backoff,
    /// while the domains run.
    fn run(mut self, net: &mut Net, mut runner: Runner, clock: &Clock) -> ExitCode {
        let ctl = self.ctl;
        let mut backoff = Backoff::new();
        let mut acked = 0u64;
        let mut reconnecting = false;
        loop {
            let mut conn =
                match Conn::open(net, ctl, &self.config, clock.unix(), &mut 0, &mut runner) {
                    Ok(c) => c,
                    Err(Fault::Exit(code)) => return code,
                    Err(Fault::Connect(e) | Fault::Exchange(e)) => match after_failure(e, false) {
                        Failure::Retry(why) => {
                            retry(
                                net,
                                &mut backoff,
                                format_args!("cannot reach {ctl}"),
                                &why,
                                &mut runner,
                            );
                            continue;
                        }
                        Failure::Fatal { code, message } => {
                            kprintln!("{message}");
                            return code;
                        }
                    },
                };
            let ended = self.serve(
                net,
                &mut conn,
                &mut runner,
                clock,
                &mut acked,
                &mut |backoff_failures| {
                    if reconnecting {
                        kprintln!(
                            "link: reconnected to {ctl} ({backoff_failures} retries); heartbeats resume"
                        );
                        reconnecting = false;
                    }
                },
                &mut backoff,
            );
            match ended {
                Ended::Renewed => conn.close(net, &mut runner),
                Ended::Lost(why) => {
                    conn.abort(net);
                    reconnecting = true;
                    retry(
                        net,
                        &mut backoff,
                        format_args!("lost the connection to {ctl}"),
                        &why,
                        &mut runner,
                    );
                }
                Ended::Exit(ExitCode::Success) => {
                    conn.close(net, &mut runner);
                    return ExitCode::Success;
                }
                Ended::Exit(code) => {
                    conn.abort(net);
                    return code;
                }
            }
        }
    }

    /// Syncs on `conn` until it fails or the run is over.
    #[allow(clippy::too_many_arguments)]
    fn serve(
        &mut self,
        net: &mut Net,
        conn: &mut Conn,
        runner: &mut Runner,
        clock: &Clock,
        acked: &mut u64,
        on_ack: &mut dyn FnMut(u32),
        backoff: &mut Backoff,
    ) -> Ended {
        loop {
            conn.session.set_time(clock.unix());
            if self.renewal.due(clock.unix()) {
                match self.renew(net, conn, runner, clock) {
                    Ok(true) => return Ended::Renewed,
                    Ok(false) => {}
                    Err(e) => return e,
                }
            }
            let req = Request::Sync(runner.node.sync(self.heartbeat(), SYNC_HOLD_MS));
            let answer = conn.exchange(net, &req, SYNC_TIMEOUT_MS, || {}, runner);
            drop(req);
            let work = match after_sync(answer) {
                Verdict::Done(w) => w,
                Verdict::Retry(why) => return Ended::Lost(why),
                Verdict::Fatal { code, message } => {
                    kprintln!("{message}");
                    return Ended::Exit(code);
                }
            };
            *acked += 1;
            on_ack(backoff.failures());
            backoff.reset();
            let settle_ms = if !work.start.is_empty() {
                SETTLE_MS
            } else if !work.deliver.is_empty() || !work.answers.is_empty() {
                SETTLE_MESSAGES_MS
            } else {
                0
            };
            for note in runner.node.acked(work, timer::now_ns()) {
                kprintln!("node: {note}");
            }
            if *acked == 1 || acked.is_multiple_of(HEARTBEAT_LOG_EVERY) {
                kprintln!(
                    "link: heartbeat {acked} acknowledged (cpus {}, memory {})",
                    self.resources.cpus,
                    Bytes(self.resources.memory_bytes)
                );
            }
            if *acked == 1 {
                // Joined, calibrated, connected, no domains yet: the idle
                // kernel.
                kprintln!("memory: {}", memstat::footprint());
            }
            if self.heartbeats == Some(*acked) {
                kprintln!("link: {acked} heartbeats acknowledged (metta.heartbeats={acked}); done");
                return Ended::Exit(ExitCode::Success);
            }
            if settle_ms > 0 {
                // Let the domains finish with the work (new ones their first
                // activation, receivers their answers) until they all wait,
                // so the next sync carries the results rather than the
                // control node holding it while they come.
                let end = timer::now_ns() + settle_ms * MS;
                loop {
                    runner.wait();
                    if (runner.idle && !runner.node.starting()) || timer::now_ns() >= end {
                        break;
                    }
                }
            }
        }
    }

    /// Asks for a new certificate on `conn`; on success (`true`) new
    /// connections use it. A refusal is retried later; a broken connection
    /// ends it.
    fn renew(
        &mut self,
        net: &mut Net,
        conn: &mut Conn,
        runner: &mut Runner,
        clock: &Clock,
    ) -> Result<bool, Ended> {
        let req = match renew_request(&self.key) {
            Ok(r) => r,
            Err(e) => {
                self.renewal.failed(clock.unix());
                kprintln!(
                    "link: certificate renewal failed: cannot make the request: {e}; retrying in {RENEW_RETRY_SECS} s"
                );
                return Ok(false);
            }
        };
        let resp = match conn.exchange(net, &req, RENEW_TIMEOUT_MS, || {}, runner) {
            Ok(r) => r,
            Err(e) => {
                return Err(match after_failure(e, false) {
                    Failure::Retry(why) => Ended::Lost(why),
                    Failure::Fatal { code, message } => {
                        kprintln!("{message}");
                        Ended::Exit(code)
                    }
                })
            }
        };
        let now = clock.unix();
        match after_renew(resp, &self.joined, &self.key, now) {
            Ok(j) => {
                self.renewal = Renewal::new(now, j.cert_not_after);
                self.config = member_config(&j, self.key.clone());
                self.joined = j;
                kprintln!(
                    "link: certificate renewed until {}; reconnecting with it",
                    DateTime::from_unix(self.joined.cert_not_after.min(i64::MAX as u64) as i64)
                );
                Ok(true)
            }
            Err(why) => {
                self.renewal.failed(now);
                kprintln!(
                    "link: certificate renewal failed: {why}; retrying in {RENEW_RETRY_SECS} s"
                );
                Ok(false)
            }
        }
    }
}
