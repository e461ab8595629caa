//! The native kernel in QEMU: boot with `-kernel` and a command line under
//! TCG, serial console to a file, exit codes through `isa-debug-exit` — the
//! QEMU command lines of `kernel/image/test.sh`.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::{build, TestDir, POLL};

// Exit statuses: isa-debug-exit makes QEMU exit with (value << 1) | 1
// (kernel/image/src/exit.rs).
/// The kernel finished what it was asked to do.
pub const EXIT_SUCCESS: i32 = 33;
/// A panic or a CPU exception.
pub const EXIT_PANIC: i32 = 35;
/// The boot failed (e.g. a bad command line).
pub const EXIT_BOOT_FAILURE: i32 = 37;
/// The network failed (e.g. no NIC).
pub const EXIT_NET_FAILURE: i32 = 39;

/// The network card a VM gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nic {
    /// QEMU's default for `-M pc` (an e1000, which the kernel does not drive).
    Default,
    /// virtio-net on QEMU's user-mode network: DHCP from 10.0.2.2, which is
    /// also the host's loopback.
    UserVirtio,
    /// `-nic none`.
    None,
}

/// How to boot a VM.
#[derive(Clone, Debug)]
pub struct Boot {
    cmdline: String,
    memory_mib: u32,
    cpu: Option<String>,
    nic: Nic,
}

impl Boot {
    /// The kernel with `cmdline`, 128 MiB, QEMU's default CPU (no RDRAND) and
    /// NIC.
    pub fn new(cmdline: impl Into<String>) -> Boot {
        Boot {
            cmdline: cmdline.into(),
            memory_mib: 128,
            cpu: None,
            nic: Nic::Default,
        }
    }

    /// RAM (`-m`), MiB.
    pub fn memory_mib(mut self, mib: u32) -> Boot {
        self.memory_mib = mib;
        self
    }

    /// The CPU model (`-cpu`): `max` has RDRAND under TCG, which a node key
    /// needs.
    pub fn cpu(mut self, model: &str) -> Boot {
        self.cpu = Some(model.to_string());
        self
    }

    /// The network card.
    pub fn nic(mut self, nic: Nic) -> Boot {
        self.nic = nic;
        self
    }

    /// The RAM given, MiB.
    pub fn memory(&self) -> u32 {
        self.memory_mib
    }

    /// The QEMU arguments.
    fn args(&self, serial: &std::path::Path) -> Vec<String> {
        let mut a: Vec<String> = [
            "-accel",
            "tcg",
            "-M",
            "pc",
            "-no-reboot",
            "-display",
            "none",
            "-monitor",
            "none",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ]
        .map(String::from)
        .into();
        a.extend(["-m".into(), format!("{}M", self.memory_mib)]);
        a.extend(["-serial".into(), format!("file:{}", serial.display())]);
        if let Some(cpu) = &self.cpu {
            a.extend(["-cpu".into(), cpu.clone()]);
        }
        match self.nic {
            Nic::Default => {}
            Nic::UserVirtio => a.extend(
                [
                    "-netdev",
                    "user,id=n0",
                    "-device",
                    "virtio-net-pci,netdev=n0",
                ]
                .map(String::from),
            ),
            Nic::None => a.extend(["-nic".into(), "none".into()]),
        }
        a.extend([
            "-kernel".into(),
            build::kernel_image().display().to_string(),
        ]);
        a.extend(["-append".into(), self.cmdline.clone()]);
        a
    }
}

/// A running (or finished) VM. Killed on drop; if the test is failing, its
/// serial log and QEMU's stderr are printed.
#[derive(Debug)]
pub struct Qemu<'a> {
    // Borrowed so that the directory outlives the VM writing into it.
    _dir: &'a TestDir,
    name: String,
    serial: PathBuf,
    stderr: PathBuf,
    child: Child,
    status: Option<ExitStatus>,
    started: Instant,
}

impl<'a> Qemu<'a> {
    /// Boots a VM called `name` (its files are `<name>.serial` and
    /// `<name>.stderr` in `dir`).
    pub fn boot(dir: &'a TestDir, name: &str, boot: &Boot) -> Qemu<'a> {
        let qemu = build::qemu_binary();
        let serial = dir.file(&format!("{name}.serial"));
        let stderr = dir.file(&format!("{name}.stderr"));
        let args = boot.args(&serial);
        std::fs::write(
            dir.file(&format!("{name}.cmd")),
            format!("{} {}\n", qemu.display(), args.join(" ")),
        )
        .expect("write the QEMU command line");
        let err = std::fs::File::create(&stderr).expect("create QEMU's stderr file");
        let child = Command::new(qemu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(err.try_clone().expect("stderr file"))
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", qemu.display()));
        Qemu {
            _dir: dir,
            name: name.to_string(),
            serial,
            stderr,
            child,
            status: None,
            started: Instant::now(),
        }
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Time since QEMU was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Everything on serial so far (carriage returns removed).
    pub fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial)
            .unwrap_or_default()
            .replace('\r', "")
    }

    /// The complete lines on serial so far (a line still being written is
    /// left out until QEMU has exited).
    pub fn lines(&mut self) -> Vec<String> {
        let exited = self.poll_exit().is_some();
        let text = self.serial();
        let complete = if exited {
            &text[..]
        } else {
            &text[..text.rfind('\n').map_or(0, |i| i + 1)]
        };
        complete.lines().map(str::to_string).collect()
    }

    /// QEMU's exit status, if it has exited.
    pub fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("wait for QEMU");
        }
        self.status
    }

    /// Waits until a serial line satisfies `pred` and returns it; panics if
    /// QEMU exits first or `timeout` passes. `what` names the line.
    pub fn wait_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let start = Instant::now();
        loop {
            let exited = self.poll_exit();
            if let Some(l) = self.lines().into_iter().find(|l| pred(l)) {
                return l;
            }
            if let Some(status) = exited {
                panic!(
                    "{}: QEMU exited ({status}) after {:.1?} without {what} on serial",
                    self.name,
                    self.elapsed()
                );
            }
            if start.elapsed() >= timeout {
                panic!(
                    "{}: no {what} on serial within {timeout:?} (QEMU running for {:.1?})",
                    self.name,
                    self.elapsed()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits for a serial line containing `needle`; see
    /// [`wait_line`](Self::wait_line).
    pub fn wait_text(&mut self, needle: &str, timeout: Duration) -> String {
        self.wait_line(&format!("a line with {needle:?}"), timeout, |l| {
            l.contains(needle)
        })
    }

    /// Waits for QEMU to exit and returns its exit code; panics after
    /// `timeout`, or if it was killed by a signal.
    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.poll_exit() {
                break s;
            }
            if start.elapsed() >= timeout {
                panic!(
                    "{}: QEMU still running after {timeout:?} (started {:.1?} ago)",
                    self.name,
                    self.elapsed()
                );
            }
            std::thread::sleep(POLL);
        };
        status
            .code()
            .unwrap_or_else(|| panic!("{}: QEMU ended by a signal ({status})", self.name))
    }

    /// Stops the VM (SIGKILL) if it is still running.
    pub fn kill(&mut self) {
        if self.poll_exit().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for Qemu<'_> {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- serial of {} ({}) ----\n{}---- end of serial of {} ----",
                self.name,
                self.serial.display(),
                crate::tail(&self.serial(), 400),
                self.name
            );
            let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            if !err.trim().is_empty() {
                eprintln!("---- QEMU stderr of {} ----\n{err}", self.name);
            }
        }
    }
}

/// A serial line's timestamp (seconds since boot) and text, if it has the
/// kernel's `[    0.010672] ` prefix: seconds right-aligned in at least five
/// places, six decimals.
pub fn stamped(line: &str) -> Option<(f64, &str)> {
    let rest = line.strip_prefix('[')?;
    let (stamp, text) = rest.split_once("] ")?;
    let digits = stamp.trim_start_matches(' ');
    let (int, frac) = digits.split_once('.')?;
    let ok = !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.len() == 6
        && frac.bytes().all(|b| b.is_ascii_digit());
    if !ok {
        return None;
    }
    Some((digits.parse().ok()?, text))
}

/// The text of a serial line without its timestamp (the line itself if it
/// has none).
pub fn text(line: &str) -> &str {
    stamped(line).map_or(line, |(_, t)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(
            stamped("[    0.010672] metta-kernel 0.1.0 booted"),
            Some((0.010672, "metta-kernel 0.1.0 booted"))
        );
        assert_eq!(stamped("[12345.000001] x"), Some((12345.000001, "x")));
        assert_eq!(stamped("[    0.01067] x"), None);
        assert_eq!(stamped("[     .010672] x"), None);
        assert_eq!(stamped("metta-kernel: this CPU has no long mode"), None);
        assert_eq!(text("[    1.000000] link: x"), "link: x");
    }
}
