//! The native node's link to the control plane: join with the token from the
//! command line, then heartbeat, over TLS 1.3 on a smoltcp TCP socket.
//!
//! This is the driver around two pure pieces: the sans-IO TLS session and
//! requests of `metta-link` (`Session`, `join_request`, `heartbeat_request`)
//! and the retry policy of [`metta_kernel::linkpolicy`] (backoff; which
//! failures are retried and which end the boot with which exit code). The
//! driver owns what they leave out:
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
//!   the session. Between polls the CPU halts until the next timer tick
//!   (1 ms: the NIC's interrupts are not used), so waiting costs no CPU.
//!   Every wait has a deadline: [`CONNECT_TIMEOUT_MS`] for the TCP
//!   connection, [`JOIN_TIMEOUT_MS`] for the handshake and the join answer,
//!   [`HEARTBEAT_TIMEOUT_MS`] for a heartbeat's.
//!
//! # What it does
//!
//! 1. **Join**: connect to `metta.ctl`, open a session *pinned* to the CA in
//!    the token, send the join request (token credential, CSR, name,
//!    `<lease address>:0` as the address — a native node accepts no
//!    connections yet — and the hardware: 1 CPU, since only the boot CPU
//!    runs, and the usable RAM of the multiboot memory map). Prints
//!    `joined cluster <c> as node/<id> in <ms> ms (certificate until
//!    <date>)`, the milliseconds counted from kernel entry, and how the join
//!    split (DHCP, key and CSR, TCP connect, TLS handshake, request to
//!    answer).
//! 2. **Heartbeats**: a member session with the issued certificate, a
//!    heartbeat every [`HEARTBEAT_INTERVAL_MS`] on the same connection
//!    (the control plane counts a node `up` while it heard from it in the
//!    last 3 s); with `metta.heartbeats=<n>` it exits with the success code
//!    after `n` acknowledged heartbeats, else it runs until stopped.
//! 3. **Failures** (the policy's verdicts): an unreachable control plane is
//!    retried with backoff (`link: cannot reach <addr>: <why>; retrying in
//!    <n> s`, 0.5 s doubling to 8 s), a lost connection is re-established the
//!    same way (`link: lost the connection ...`, then `link: reconnected ...`
//!    once a heartbeat is acknowledged again); the wrong cluster, a rejected
//!    token or a refused node print why and exit with their own codes.
//!
//! The token's secret is never printed: only its id.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use metta_kernel::bootcfg::{CtlAddr, JoinConfig};
use metta_kernel::exit::ExitCode;
use metta_kernel::linkpolicy::{
    after_failure, after_heartbeat, after_join, AttemptError, Backoff, Failure, IoError, Seconds,
    Verdict,
};
use metta_kernel::multiboot::Bytes;
use metta_kernel::rtc::DateTime;
use metta_link::{heartbeat_request, join_request, rng, Joined, LinkConfig, NodeKey, Session};
use metta_proto::{NodeResources, Request, Response};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::State;
use smoltcp::wire::Ipv4Address;

use crate::net::Net;
use crate::{cmos, entropy, kprintln, timer};

/// How long a TCP connection may take to be established.
pub const CONNECT_TIMEOUT_MS: u64 = 3_000;
/// How long the TLS handshake and the join answer may take.
pub const JOIN_TIMEOUT_MS: u64 = 10_000;
/// How long a heartbeat's answer may take (including a member handshake).
pub const HEARTBEAT_TIMEOUT_MS: u64 = 5_000;
/// Time between heartbeats.
pub const HEARTBEAT_INTERVAL_MS: u64 = 1_000;
/// Acknowledged heartbeats are logged: the first, then every this many.
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

/// Keeps the network polled for `ms` milliseconds.
fn sleep_polling(net: &mut Net, ms: u64) {
    let end = timer::now_ns() + ms * MS;
    while timer::now_ns() < end {
        net.poll();
        wait_tick();
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
}

/// Opens a TCP connection to `ctl`.
fn connect(net: &mut Net, ctl: CtlAddr) -> Result<SocketHandle, IoError> {
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
        wait_tick();
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
    ) -> Result<Conn, Fault> {
        let entropy = fresh32().map_err(Fault::Exit)?;
        let t = timer::now_ns();
        let h = connect(net, ctl).map_err(|e| Fault::Connect(e.into()))?;
        *tcp_ns = timer::now_ns() - t;
        match Session::new(config, now, &entropy) {
            Ok(session) => Ok(Conn {
                h,
                session,
                out: Vec::new(),
                buf: alloc::vec![0; READ_CHUNK],
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
                Ok(n) => self.session.receive(&self.buf[..n])?,
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

    /// One request and its answer, within `timeout_ms`. `on_established`
    /// runs once, when the handshake has finished.
    fn exchange(
        &mut self,
        net: &mut Net,
        req: &Request,
        timeout_ms: u64,
        mut on_established: impl FnMut(),
    ) -> Result<Response, AttemptError> {
        let mut established = !self.session.is_handshaking();
        self.session.send_frame(req)?;
        let deadline = now_ms() + timeout_ms;
        loop {
            let open = self.pump(net)?;
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
            wait_tick();
        }
    }

    /// Waits until `until_ns`, keeping the connection serviced. Errors if the
    /// server closed it meanwhile.
    fn idle_until(&mut self, net: &mut Net, until_ns: u64) -> Result<(), AttemptError> {
        while timer::now_ns() < until_ns {
            if !self.pump(net)? {
                self.session.connection_closed()?;
                return Err(AttemptError::Link(metta_link::LinkError::PeerClosed {
                    awaiting: false,
                    partial: 0,
                }));
            }
            wait_tick();
        }
        Ok(())
    }

    /// Ends the session politely (close_notify, FIN) and drops the socket.
    fn close(mut self, net: &mut Net) {
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
            wait_tick();
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
    let mut conn = Conn::open(net, ctl, config, clock.unix(), &mut times.tcp)?;
    let t1 = timer::now_ns();
    times.hello = (t1 - t0).saturating_sub(times.tcp);
    let mut t2 = t1;
    let r = conn.exchange(net, req, JOIN_TIMEOUT_MS, || t2 = timer::now_ns());
    let t3 = timer::now_ns();
    times.handshake = t2 - t1;
    times.answer = t3 - t2;
    match r {
        Ok(resp) => {
            conn.close(net);
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
fn retry(net: &mut Net, backoff: &mut Backoff, what: core::fmt::Arguments<'_>, why: &str) {
    let wait = backoff.fail();
    kprintln!("link: {what}: {why}; retrying in {}", Seconds(wait));
    sleep_polling(net, wait);
}

/// Joins the cluster, then heartbeats (see the module docs). Returns the exit
/// code: success after `metta.heartbeats` heartbeats, else the failure's.
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
                    retry(net, &mut backoff, format_args!("cannot reach {ctl}"), &why);
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
    heartbeat(net, cfg, &joined, id.key, node, &addr, &clock)
}

/// The member phase: heartbeats on a session with the node's certificate,
/// reconnecting with backoff when the connection is lost.
fn heartbeat(
    net: &mut Net,
    cfg: &JoinConfig<'_>,
    joined: &Joined,
    key: NodeKey,
    node: &NodeInfo,
    addr: &str,
    clock: &Clock,
) -> ExitCode {
    let ctl = cfg.ctl;
    let config = joined.link_config(key);
    let hb = heartbeat_request(node.resources.clone(), joined.cert_not_after, addr);
    let mut backoff = Backoff::new();
    let mut acked = 0u64;
    let mut reconnecting = false;
    let mut next_ns = timer::now_ns();
    loop {
        let mut conn = match Conn::open(net, ctl, &config, clock.unix(), &mut 0) {
            Ok(c) => c,
            Err(Fault::Exit(code)) => return code,
            Err(Fault::Connect(e) | Fault::Exchange(e)) => match after_failure(e, false) {
                Failure::Retry(why) => {
                    retry(net, &mut backoff, format_args!("cannot reach {ctl}"), &why);
                    continue;
                }
                Failure::Fatal { code, message } => {
                    kprintln!("{message}");
                    return code;
                }
            },
        };
        loop {
            let answer = conn.idle_until(net, next_ns).and_then(|()| {
                conn.session.set_time(clock.unix());
                conn.exchange(net, &hb, HEARTBEAT_TIMEOUT_MS, || {})
            });
            match after_heartbeat(answer) {
                Verdict::Done(()) => {
                    acked += 1;
                    if reconnecting {
                        kprintln!(
                            "link: reconnected to {ctl} ({} retries); heartbeats resume",
                            backoff.failures()
                        );
                        reconnecting = false;
                    }
                    backoff.reset();
                    if acked == 1 || acked.is_multiple_of(HEARTBEAT_LOG_EVERY) {
                        kprintln!(
                            "link: heartbeat {acked} acknowledged (cpus {}, memory {})",
                            node.resources.cpus,
                            Bytes(node.resources.memory_bytes)
                        );
                    }
                    if cfg.heartbeats == Some(acked) {
                        kprintln!(
                            "link: {acked} heartbeats acknowledged (metta.heartbeats={acked}); done"
                        );
                        conn.close(net);
                        return ExitCode::Success;
                    }
                    next_ns = (next_ns + HEARTBEAT_INTERVAL_MS * MS).max(timer::now_ns());
                }
                Verdict::Retry(why) => {
                    conn.abort(net);
                    reconnecting = true;
                    retry(
                        net,
                        &mut backoff,
                        format_args!("lost the connection to {ctl}"),
                        &why,
                    );
                    break;
                }
                Verdict::Fatal { code, message } => {
                    kprintln!("{message}");
                    conn.abort(net);
                    return code;
                }
            }
        }
    }
}
