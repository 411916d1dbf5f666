//! Operations that keep a client connection open: exec (stdio passed as fds, or a pty
//! master handed back), console attach (raw byte relay), and console logs.

use crate::keeper::KeeperRequest;
use crate::node::{err, internal, NResult, Node};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use vessel_api::frame::write_frame;
use vessel_types::api::{ErrorCode, Response};
use vessel_types::{Name, VeStatus};
use vessel_ve::runtime::{Helper, HelperReport, HelperRequest};

impl Node {
    /// The host pid of the VE's init, or why there is none.
    fn require_running(&self, name: &Name) -> NResult<i32> {
        let rec = self.record(name)?;
        if rec.status != VeStatus::Running {
            return Err(err(
                ErrorCode::Conflict,
                format!("VE '{name}' is not running: start it with `vessel ve start {name}`"),
            ));
        }
        rec.pid
            .ok_or_else(|| err(ErrorCode::Conflict, format!("VE '{name}' has no init")))
    }

    /// Run `argv` in the VE. Replies `ExecStarted` (with the pty master when `tty`), then
    /// `Exit`. Without a tty the command uses the three fds the client sent as its stdio.
    #[allow(clippy::too_many_arguments)]
    pub fn exec(
        &self,
        conn: &UnixStream,
        name: &Name,
        argv: Vec<String>,
        tty: bool,
        env: Vec<String>,
        cwd: Option<String>,
        fds: Vec<OwnedFd>,
    ) -> NResult<()> {
        check_exec(&argv, &env)?;
        self.require_running(name)?;
        let stdio = exec_stdio(tty, fds)?;
        let mut started = self.exec_start(name, argv, tty, env, cwd, stdio)?;
        let raw: Vec<i32> = started.master.iter().map(|f| f.as_raw_fd()).collect();
        let _ = write_frame(conn.as_raw_fd(), &Response::ExecStarted, &raw);
        drop(started.master.take());
        let code = started.wait(name)?;
        let _ = write_frame(conn.as_raw_fd(), &Response::Exit { code }, &[]);
        Ok(())
    }

    /// Start `argv` in the VE (stdio: the command's three fds; `None` with `tty`: a pty
    /// in the VE, whose master comes back). Returns once the command runs.
    pub fn exec_start(
        &self,
        name: &Name,
        argv: Vec<String>,
        tty: bool,
        env: Vec<String>,
        cwd: Option<String>,
        stdio: Option<[OwnedFd; 3]>,
    ) -> NResult<Started> {
        check_exec(&argv, &env)?;
        let init_pid = self.require_running(name)?;
        let config = self.layout.ve(name.as_str()).bundle().join("config.json");
        let cgroup_dirs = self.cgroup(name).dirs();
        let req = HelperRequest::Exec {
            init_pid,
            config,
            cgroup_dirs,
            argv,
            env,
            cwd,
            tty,
        };
        let mut h = Helper::spawn(&self.opts.exe, &req, stdio).map_err(|e| internal("exec helper", e))?;
        let started = (|| {
            let (r, fds) = h.next_report().map_err(|e| internal("exec", e))?;
            match r {
                HelperReport::ExecStarted { .. } => Ok(fds.into_iter().next()),
                HelperReport::Error { message } => {
                    Err(err(ErrorCode::Internal, format!("exec in VE '{name}': {message}")))
                }
                other => Err(internal("exec", format!("unexpected report {other:?}"))),
            }
        })();
        match started {
            Ok(master) => Ok(Started { helper: h, master }),
            Err(e) => {
                let _ = h.wait();
                Err(e)
            }
        }
    }

    /// Attach the client to the VE's console: the reply `ConsoleAttached` carries a
    /// connection to the console keeper that relays raw bytes both ways.
    pub fn console(&self, conn: &UnixStream, name: &Name) -> NResult<()> {
        let stream = self.console_stream(name)?;
        write_frame(conn.as_raw_fd(), &Response::ConsoleAttached, &[stream.as_raw_fd()])
            .map_err(|e| internal("console", e))?;
        Ok(())
    }

    /// A connection to the console keeper attached to the VE's console (raw bytes both
    /// ways; closing it detaches).
    pub fn console_stream(&self, name: &Name) -> NResult<UnixStream> {
        self.require_running(name)?;
        let held = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .is_some_and(|l| l.console);
        if !held {
            return Err(err(
                ErrorCode::Conflict,
                format!("VE '{name}' has no console (its console keeper was gone): `vessel ve restart {name}` brings it back; `vessel ve exec -t {name} -- sh` works now"),
            ));
        }
        let (_, stream) = self
            .keeper
            .call(&KeeperRequest::Attach { ve: name.to_string() }, &[], false)
            .map_err(|e| internal("console keeper", e))?;
        Ok(stream)
    }

    /// The VE's console log (both rotation files), at most `tail` bytes from the end, as
    /// the VE wrote them.
    pub fn logs(&self, name: &Name, tail: Option<u64>) -> NResult<Vec<u8>> {
        self.record(name)?;
        let log = self.layout.ve(name.as_str()).console_log();
        let mut data = std::fs::read(log.with_extension("log.1")).unwrap_or_default();
        data.extend(std::fs::read(&log).unwrap_or_default());
        let tail = tail.unwrap_or(64 << 10) as usize;
        let start = data.len().saturating_sub(tail);
        data.drain(..start);
        Ok(data)
    }
}

fn check_exec(argv: &[String], env: &[String]) -> NResult<()> {
    if argv.is_empty() {
        return Err(err(
            ErrorCode::InvalidArgument,
            "no command given: use `vessel ve exec NAME -- COMMAND...`",
        ));
    }
    if let Some(e) = env.iter().find(|e| !e.contains('=')) {
        return Err(err(
            ErrorCode::InvalidArgument,
            format!("environment entry '{e}' must look like KEY=VALUE"),
        ));
    }
    Ok(())
}

/// A command running in a VE (see [`Node::exec_start`]).
pub struct Started {
    pub helper: Helper,
    /// The pty master, when the command has a terminal.
    pub master: Option<OwnedFd>,
}

impl Started {
    /// Wait for the command's exit code (and for its helper).
    pub fn wait(mut self, name: &Name) -> NResult<i32> {
        let r = self.exited(name);
        let _ = self.helper.wait();
        r
    }

    /// Read the helper's last report: the exit code (blocks until the command ends).
    pub fn exited(&mut self, name: &Name) -> NResult<i32> {
        match self.helper.next_report().map_err(|e| internal("exec", e))?.0 {
            HelperReport::Exited { code } => Ok(code),
            HelperReport::Error { message } => Err(err(ErrorCode::Internal, format!("exec in VE '{name}': {message}"))),
            other => Err(internal("exec", format!("unexpected report {other:?}"))),
        }
    }
}

/// The client's stdin, stdout and stderr for an exec without a tty (none with one).
pub(crate) fn exec_stdio(tty: bool, fds: Vec<OwnedFd>) -> NResult<Option<[OwnedFd; 3]>> {
    if tty {
        return Ok(None);
    }
    let n = fds.len();
    fds.try_into().map(Some).map_err(|_| {
        err(
            ErrorCode::InvalidArgument,
            format!("exec without a tty needs 3 fds (stdin, stdout, stderr), got {n}"),
        )
    })
}
