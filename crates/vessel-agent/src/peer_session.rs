//! The VE's side of another node's `exec` and `console` (two-way streams of
//! `vessel_peer::duplex` frames): the command's pipes or pty, or the console keeper's
//! connection, relayed to and from frames by one poll loop per session.
//!
//! exec: `Stdin` frames go to the command's stdin (buffered, so a command that does not
//! read its stdin cannot stop its output), `Eof` closes it (with a tty: nothing, as a
//! local `exec -t` sends nothing either), `Resize` sets the pty's size, `Hangup` closes
//! that output's pipe (the command then gets EPIPE, as locally). Its stdout and stderr (or
//! the pty) go out as frames. When the helper reports the exit code, what the command
//! wrote is in the pipes already: they are read until empty, then `Exit` and the TLS close.
//! A caller that goes away closes the pipes; the command is reaped by a thread of its own.
//! console: the keeper's connection both ways; its end (the VE stopped) is `Exit(0)`, the
//! caller's TLS close is a detach.

use crate::interactive::Started;
use crate::node::{internal, NResult, Node};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vessel_peer::channel::poll;
use vessel_peer::duplex::{Output, MAX_PAYLOAD};
use vessel_peer::{Channel, DuplexSession, Event, Frame};
use vessel_types::Name;

/// Stop reading the command's output while this much waits for the other node.
const OUT_LIMIT: usize = 256 << 10;
/// Stop taking frames while this much stdin waits for the command.
const IN_LIMIT: usize = 1 << 20;

/// Make `fd` non-blocking (an fd of this node's: a pipe, a pty, a socket).
pub(crate) fn nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd this node owns; F_GETFL/F_SETFL take no pointers.
    let rc = unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 {
            fl
        } else {
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK)
        }
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn pipe() -> NResult<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| internal("pipe", e))
}

/// A session's local ends.
pub struct Session {
    name: Name,
    /// Where `Stdin` frames go (non-blocking).
    input: Option<OwnedFd>,
    /// `Eof` closes the input (not for a pty).
    close_on_eof: bool,
    /// The pty whose size `Resize` sets.
    pty: Option<RawFd>,
    /// Read and sent as frames (non-blocking).
    outputs: Vec<(OwnedFd, Output)>,
    /// The command, for exec.
    started: Option<Started>,
}

impl Node {
    /// Start an exec for another node: pipes for its stdio, or a pty.
    pub fn exec_for_peer(
        &self,
        name: &Name,
        argv: Vec<String>,
        tty: bool,
        env: Vec<String>,
        cwd: Option<String>,
    ) -> NResult<Session> {
        if tty {
            let mut started = self.exec_start(name, argv, true, env, cwd, None)?;
            let master = started
                .master
                .take()
                .ok_or_else(|| internal("exec", "the helper sent no terminal"))?;
            let input = master.try_clone().map_err(|e| internal("exec", e))?;
            nonblocking(master.as_raw_fd()).map_err(|e| internal("exec", e))?;
            return Ok(Session {
                name: name.clone(),
                pty: Some(input.as_raw_fd()),
                input: Some(input),
                close_on_eof: false,
                outputs: vec![(master, Output::Stdout)],
                started: Some(started),
            });
        }
        let (in_r, in_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        for fd in [&in_w, &out_r, &err_r] {
            nonblocking(fd.as_raw_fd()).map_err(|e| internal("exec", e))?;
        }
        let started = self.exec_start(name, argv, false, env, cwd, Some([in_r, out_w, err_w]))?;
        Ok(Session {
            name: name.clone(),
            input: Some(in_w),
            close_on_eof: true,
            pty: None,
            outputs: vec![(out_r, Output::Stdout), (err_r, Output::Stderr)],
            started: Some(started),
        })
    }

    /// Attach another node to a VE's console.
    pub fn console_for_peer(&self, name: &Name) -> NResult<Session> {
        let stream = self.console_stream(name)?;
        stream.set_nonblocking(true).map_err(|e| internal("console", e))?;
        let out = OwnedFd::from(stream);
        let input = out.try_clone().map_err(|e| internal("console", e))?;
        Ok(Session {
            name: name.clone(),
            input: Some(input),
            close_on_eof: false,
            pty: None,
            outputs: vec![(out, Output::Stdout)],
            started: None,
        })
    }
}

fn set_winsize(fd: RawFd, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a live local.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
}

enum Read {
    Data(usize),
    Empty,
    End,
}

fn read_fd(fd: RawFd, buf: &mut [u8]) -> Read {
    // SAFETY: `buf` is a live, exclusively borrowed buffer of that length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n > 0 {
        return Read::Data(n as usize);
    }
    if n == 0 {
        return Read::End;
    }
    match std::io::Error::last_os_error().kind() {
        std::io::ErrorKind::WouldBlock => Read::Empty,
        std::io::ErrorKind::Interrupted => Read::Empty,
        // EIO: a pty whose last writer closed; anything else ends that output too.
        _ => Read::End,
    }
}

impl Session {
    fn close_output(&mut self, o: Output) {
        self.outputs.retain(|(_, k)| *k != o);
    }

    /// Write what stdin holds, as far as the command takes it.
    fn feed(&mut self, pending: &mut Vec<u8>) {
        let Some(fd) = &self.input else {
            pending.clear();
            return;
        };
        while !pending.is_empty() {
            // SAFETY: `pending` is a live buffer of that length; the fd is ours.
            let n = unsafe { libc::write(fd.as_raw_fd(), pending.as_ptr().cast(), pending.len()) };
            if n > 0 {
                pending.drain(..n as usize);
                continue;
            }
            match std::io::Error::last_os_error().kind() {
                std::io::ErrorKind::WouldBlock => return,
                std::io::ErrorKind::Interrupted => {}
                // The command closed its stdin: what it did not read is dropped.
                _ => {
                    self.input = None;
                    pending.clear();
                    return;
                }
            }
        }
    }

    /// The loop; `Err` when the caller is gone or broke the protocol (the stream then ends
    /// without its TLS close).
    fn relay(&mut self, ch: &mut Channel) -> Result<i32, String> {
        let mut pending: Vec<u8> = Vec::new();
        let mut eof = false;
        let mut exited: Option<NResult<i32>> = None;
        let mut buf = vec![0u8; MAX_PAYLOAD];
        loop {
            loop {
                match ch.event().map_err(|e| e.to_string())? {
                    Event::Frame(Frame::Stdin(d)) => {
                        if self.input.is_some() {
                            pending.extend_from_slice(&d);
                        }
                    }
                    Event::Frame(Frame::Eof) => eof = true,
                    Event::Frame(Frame::Resize { rows, cols }) => {
                        if let Some(p) = self.pty {
                            set_winsize(p, rows, cols);
                        }
                    }
                    Event::Frame(Frame::Hangup(o)) => self.close_output(o),
                    Event::Frame(f) => return Err(format!("the caller sent {f:?}")),
                    Event::Wait => break,
                    Event::Closed => return Err("the caller ended the stream".into()),
                }
            }
            self.feed(&mut pending);
            if eof && pending.is_empty() && self.close_on_eof {
                self.input = None;
            }
            let draining = exited.is_some();
            if draining || self.started.is_none() && self.outputs.is_empty() {
                // Everything the command wrote is in the pipes: read them until empty.
                while ch.backlog() < OUT_LIMIT && !self.outputs.is_empty() {
                    let (fd, kind) = (self.outputs[0].0.as_raw_fd(), self.outputs[0].1);
                    match read_fd(fd, &mut buf) {
                        Read::Data(n) => ch.send_data(data_kind(kind), &buf[..n]),
                        Read::Empty | Read::End => {
                            self.outputs.remove(0);
                        }
                    }
                }
                if self.outputs.is_empty() {
                    match exited.take() {
                        Some(Ok(code)) => {
                            ch.send(&Frame::Exit(code));
                            return Ok(code);
                        }
                        Some(Err(e)) => {
                            ch.send(&Frame::Error(e.message.clone()));
                            return Ok(-1);
                        }
                        None => {
                            ch.send(&Frame::Exit(0));
                            return Ok(0);
                        }
                    }
                }
            }
            let mut fds = Vec::with_capacity(5);
            let mut ev = ch.events();
            if pending.len() >= IN_LIMIT {
                ev &= !libc::POLLIN;
            }
            fds.push(libc::pollfd {
                fd: ch.raw_fd(),
                events: ev,
                revents: 0,
            });
            if let (Some(fd), false) = (&self.input, pending.is_empty()) {
                fds.push(libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                });
            }
            let first_output = fds.len();
            if ch.backlog() < OUT_LIMIT && !draining {
                for (fd, _) in &self.outputs {
                    fds.push(libc::pollfd {
                        fd: fd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    });
                }
            }
            let report = match (&self.started, draining) {
                (Some(s), false) => {
                    fds.push(libc::pollfd {
                        fd: s.helper.report_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    });
                    Some(fds.len() - 1)
                }
                _ => None,
            };
            poll(&mut fds, -1).map_err(|e| e.to_string())?;
            ch.pump(fds[0].revents).map_err(|e| e.to_string())?;
            let mut closed = Vec::new();
            for p in fds[first_output..report.unwrap_or(fds.len())].iter() {
                if p.revents == 0 {
                    continue;
                }
                let Some(i) = self.outputs.iter().position(|(fd, _)| fd.as_raw_fd() == p.fd) else {
                    continue;
                };
                match read_fd(p.fd, &mut buf) {
                    Read::Data(n) => ch.send_data(data_kind(self.outputs[i].1), &buf[..n]),
                    Read::Empty => {}
                    Read::End => closed.push(self.outputs[i].1),
                }
            }
            for o in closed {
                self.close_output(o);
            }
            if let Some(i) = report {
                if fds[i].revents != 0 {
                    let s = self.started.as_mut().expect("a report fd means a command");
                    exited = Some(s.exited(&self.name));
                }
            }
            ch.pump(0).map_err(|e| e.to_string())?;
        }
    }
}

fn data_kind(o: Output) -> fn(Vec<u8>) -> Frame {
    match o {
        Output::Stdout => Frame::Stdout,
        Output::Stderr => Frame::Stderr,
    }
}

impl DuplexSession for Session {
    fn run(mut self: Box<Self>, mut ch: Channel) {
        let r = self.relay(&mut ch);
        // The command's ends close now: it gets EOF/EPIPE if it still runs.
        self.input = None;
        self.outputs.clear();
        match r {
            Ok(_) => {
                if let Err(e) = ch.finish(Duration::from_secs(30)) {
                    tracing::debug!(ve = %self.name, "end of a stream for another node: {e}");
                }
            }
            Err(e) => tracing::debug!(ve = %self.name, "stream for another node ended: {e}"),
        }
        if let Some(s) = self.started.take() {
            let name = self.name.clone();
            // Reap the helper when the command ends (at once if it did).
            let _ = std::thread::Builder::new()
                .name("vessel-exec-reap".into())
                .spawn(move || {
                    let _ = s.wait(&name);
                });
        }
    }
}

/// A VE's export for another node: written by a thread into a pipe, read by the peer
/// server into the TLS stream. An export that fails before its first byte is the answer
/// (an error frame); one that fails later makes the read fail, so the stream ends without
/// its TLS close and the caller sees it cut, never a short tar taken as whole. A caller
/// that goes away closes the pipe, and the export ends on its next write.
pub fn export_stream(node: Arc<Node>, name: Name) -> NResult<Box<dyn std::io::Read + Send>> {
    let (r, w) = pipe()?;
    let result: Arc<Mutex<Option<NResult<()>>>> = Arc::new(Mutex::new(None));
    let res = result.clone();
    let thread = std::thread::Builder::new()
        .name("vessel-export".into())
        .spawn(move || {
            let out = std::fs::File::from(w);
            let r = node.export_until(&name, out, &|| false);
            *res.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        })
        .map_err(|e| internal("export thread", e))?;
    let mut reader = ExportReader {
        pipe: std::fs::File::from(r),
        result,
        thread: Some(thread),
    };
    let mut first = vec![0u8; 64 << 10];
    let n = match reader.read_or_result(&mut first) {
        Ok(n) => n,
        Err(Ok(e)) => return Err(e),
        Err(Err(e)) => return Err(internal("export", e)),
    };
    first.truncate(n);
    Ok(Box::new(std::io::Read::chain(std::io::Cursor::new(first), reader)))
}

struct ExportReader {
    pipe: std::fs::File,
    result: Arc<Mutex<Option<NResult<()>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ExportReader {
    /// Bytes, or at the pipe's end the export's own error (`Ok(ApiError)`) or a read
    /// error.
    fn read_or_result(&mut self, buf: &mut [u8]) -> Result<usize, Result<vessel_types::api::ApiError, std::io::Error>> {
        let n = std::io::Read::read(&mut self.pipe, buf).map_err(Err)?;
        if n > 0 || buf.is_empty() {
            return Ok(n);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        match &*self.result.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(Ok(())) => Ok(0),
            Some(Err(e)) => Err(Ok(e.clone())),
            None => Err(Err(std::io::Error::other("the export ended without a result"))),
        }
    }
}

impl std::io::Read for ExportReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.read_or_result(buf).map_err(|e| match e {
            Ok(e) => {
                tracing::warn!("export for another node failed: {}", e.message);
                std::io::Error::other(e.message)
            }
            Err(e) => e,
        })
    }
}
