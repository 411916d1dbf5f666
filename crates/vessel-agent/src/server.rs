//! The local API server: a Unix socket only root may open, one thread per connection,
//! requests dispatched to the [`Node`]. Malformed frames get an error reply, never a panic.
//!
//! Bounded against a misbehaving client: at most `api.max_connections` connections are
//! served at once (more get a `busy` error from the accept thread, which spawns nothing for
//! them); a request frame must arrive whole within `api.request_timeout` (requests are
//! small: see `vessel_api::frame::read_request`), and replies that nobody reads time out
//! too. Long operations (`exec`, a template build) hold their connection while they run;
//! a console attachment runs over its own connection to the console keeper.

use crate::node::Node;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vessel_api::frame::{read_request, write_frame, FrameError};
use vessel_types::api::{ApiError, ErrorCode, Request, Response};
use vessel_types::config::ApiSettings;

/// Bind the socket, refusing if a live daemon already answers on it.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("a vessel daemon already listens on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// One of the bounded connection slots; freed when dropped (also when the connection's
/// thread could not be spawned).
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(active: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Slot(active.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub fn serve(node: Arc<Node>, listener: UnixListener) {
    let api = node.opts.settings.api;
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        match conn {
            Ok(c) => {
                let Some(slot) = Slot::take(&active, api.max_connections) else {
                    refuse_busy(c, &api);
                    continue;
                };
                let node = node.clone();
                let spawned = std::thread::Builder::new().name("vessel-conn".into()).spawn(move || {
                    let _slot = slot;
                    handle(&node, c, &api)
                });
                if let Err(e) = spawned {
                    tracing::warn!("no thread for an API connection: {e}");
                }
            }
            Err(e) => {
                // Out of fds or memory: do not spin on accept.
                tracing::warn!("accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Tell a client over the connection bound why it is turned away, without blocking the
/// accept thread.
fn refuse_busy(conn: UnixStream, api: &ApiSettings) {
    let _ = conn.set_nonblocking(true);
    let e = ApiError::new(
        ErrorCode::Busy,
        format!(
            "the vessel daemon is busy: it serves {} API connections at once (`api.max_connections` in the node config); try again",
            api.max_connections
        ),
    );
    let _ = write_frame(conn.as_raw_fd(), &Response::Error(e), &[]);
}

fn reply(conn: &UnixStream, r: &Response) -> bool {
    write_frame(conn.as_raw_fd(), r, &[]).is_ok()
}

fn handle(node: &Arc<Node>, conn: UnixStream, api: &ApiSettings) {
    let timeout = Duration::from_secs(api.request_timeout_secs);
    // A reply the client does not read must not hold this thread forever either.
    let _ = conn.set_write_timeout(Some(timeout));
    loop {
        let (req, fds) = match read_request(conn.as_raw_fd(), Some(Instant::now() + timeout)) {
            Ok(x) => x,
            Err(FrameError::Closed | FrameError::TimedOut { got: 0 }) => return,
            Err(
                e @ (FrameError::Decode(_)
                | FrameError::Version(_)
                | FrameError::TooLarge { .. }
                | FrameError::TooManyFds
                | FrameError::TimedOut { .. }),
            ) => {
                let code = if matches!(e, FrameError::Version(_)) {
                    ErrorCode::VersionMismatch
                } else {
                    ErrorCode::InvalidArgument
                };
                reply(&conn, &Response::Error(ApiError::new(code, e.to_string())));
                return;
            }
            Err(e) => {
                tracing::debug!("connection: {e}");
                return;
            }
        };
        let result = dispatch(node, &conn, req, fds);
        let r = match result {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => Response::Error(e),
        };
        if !reply(&conn, &r) {
            return;
        }
    }
}

fn dispatch(
    node: &Arc<Node>,
    conn: &UnixStream,
    req: Request,
    fds: Vec<std::os::fd::OwnedFd>,
) -> Result<Option<Response>, ApiError> {
    let mut progress = |message: &str, done: u64, total: u64| {
        reply(
            conn,
            &Response::Progress {
                message: message.to_string(),
                done,
                total,
            },
        );
    };
    if let Some((name, _)) = served_by_the_ves_node(&req) {
        if let Some(to) = node.elsewhere(name)? {
            return node.forward(conn, &to, req, fds);
        }
    }
    Ok(Some(match req {
        Request::Status => Response::Status(node.status()),
        Request::NodeList => Response::Cluster(node.cluster_view()?),
        Request::NodeDrain { name, drain } => {
            node.node_change(&name, Some(drain), false)?;
            Response::Ok
        }
        Request::NodeRemove { name, force } => {
            node.node_change(&name, None, force)?;
            Response::Ok
        }
        Request::ClusterInit { token_ttl_secs } => {
            Response::JoinToken(node.peer()?.init(Duration::from_secs(token_ttl_secs))?)
        }
        Request::ClusterToken { ttl_secs } => Response::JoinToken(node.peer()?.token(Duration::from_secs(ttl_secs))?),
        Request::TemplateBuild { kind, name } => {
            let t = node.template_build(kind, name, &mut progress)?;
            node.publish_templates();
            Response::Template(t)
        }
        Request::TemplateList => Response::Templates {
            templates: node.template_list(),
        },
        Request::TemplateShow { name } => Response::Template(node.template_show(&name)?),
        Request::TemplateRemove { name } => {
            node.template_remove(&name)?;
            node.publish_templates();
            Response::Ok
        }
        Request::VeCreate { spec, start, place } => {
            Response::Ve(Box::new(node.cluster_create(spec, start, &place, &mut progress)?))
        }
        Request::VeList => Response::Ves {
            ves: node.cluster_list(),
        },
        Request::VeShow { name } => Response::Ve(Box::new(node.cluster_show(&name)?)),
        Request::VeStart { name } => Response::Ve(Box::new(node.cluster_start(&name)?)),
        Request::VeStop { name, timeout_secs } => {
            Response::Ve(Box::new(node.cluster_stop(&name, Duration::from_secs(timeout_secs))?))
        }
        Request::VeDestroy { name, force } => {
            node.cluster_destroy(&name, force)?;
            Response::Ok
        }
        Request::VeSet { name, change } => Response::Ve(Box::new(node.cluster_set(&name, &change)?)),
        Request::VeExec {
            name,
            argv,
            tty,
            env,
            cwd,
        } => {
            node.exec(conn, &name, argv, tty, env, cwd, fds)?;
            return Ok(None);
        }
        Request::VeConsole { name } => {
            node.console(conn, &name)?;
            return Ok(None);
        }
        Request::VeExport { name } => {
            let fd = fds
                .into_iter()
                .next()
                .ok_or_else(|| crate::node::err(ErrorCode::InvalidArgument, "export needs the output as an fd"))?;
            // Ends when the client hangs up, even if its output is never drained.
            let c = conn.as_raw_fd();
            let out = crate::clientout::ClientOut::new(fd, c);
            node.export_until(&name, out, &|| crate::clientout::peer_gone(c))?;
            Response::Ok
        }
        Request::VeImport { name, start } => {
            let fd = fds
                .into_iter()
                .next()
                .ok_or_else(|| crate::node::err(ErrorCode::InvalidArgument, "import needs the input as an fd"))?;
            Response::Ve(Box::new(node.cluster_import(name, start, fd)?))
        }
        Request::TemplateFetch { name, from } => {
            Response::Template(node.template_fetch(&name, from.as_deref(), &mut progress)?)
        }
        Request::VeMove { name, to } => Response::Ve(Box::new(node.ve_move(&name, &to, &mut progress)?)),
        Request::VeMoveIn { .. } | Request::VeAdoptCopy { .. } => {
            return Err(crate::node::err(
                ErrorCode::InvalidArgument,
                "`ve-move-in` is a call between nodes: use `vessel ve move NAME --to NODE`",
            ))
        }
        // restart, logs, diff, history, revert, rollback, rescue: as for other nodes' calls.
        other => ve_call(node, &other).unwrap_or_else(|| {
            Err(crate::node::err(
                ErrorCode::Internal,
                format!("no handler for {other:?}"),
            ))
        })?,
    }))
}

/// The requests on a VE of this node that are answered at once (no fds, no stream): this
/// node's API and other nodes' calls serve them alike (`None` for any other request).
pub(crate) fn ve_call(node: &Node, req: &Request) -> Option<Result<Response, ApiError>> {
    Some(match req {
        Request::VeRestart { name, timeout_secs } => node
            .restart(name, Duration::from_secs(*timeout_secs))
            .map(|i| Response::Ve(Box::new(i))),
        Request::VeLogs { name, tail_bytes, raw } => node.logs(name, *tail_bytes).map(|data| {
            if *raw {
                Response::LogBytes { data }
            } else {
                Response::Logs {
                    text: String::from_utf8_lossy(&data).into_owned(),
                }
            }
        }),
        Request::VeDiff { name, path } => node
            .diff(name, path.as_deref())
            .map(|entries| Response::Diff { entries }),
        Request::VeHistory { name, path } => node.history(name, path).map(|entries| Response::History { entries }),
        Request::VeRevert { name, path, to } => node
            .revert(name, path, *to)
            .map(|changed| Response::Reverted { changed }),
        Request::VeRollback { name, to } => node.rollback(name, *to).map(|changed| Response::Reverted { changed }),
        Request::VeRescue { name, end } => node
            .rescue(name, *end)
            .and_then(|()| node.show(name))
            .map(|i| Response::Ve(Box::new(i))),
        Request::VeScrub { name, repair } => node.scrub_and_record(name, false).and_then(|r| {
            if *repair {
                node.drop_copies(name, &r.bad())?;
            }
            Ok(Response::Scrubbed { copies: r.copies })
        }),
        _ => return None,
    })
}

/// Requests the VE's own node serves: carried there (`forward`) for a VE on another node.
fn served_by_the_ves_node(req: &Request) -> Option<(&vessel_types::Name, &'static str)> {
    Some(match req {
        Request::VeRestart { name, .. } => (name, "restart"),
        Request::VeExec { name, .. } => (name, "exec"),
        Request::VeConsole { name } => (name, "console"),
        Request::VeLogs { name, .. } => (name, "logs"),
        Request::VeDiff { name, .. } => (name, "diff"),
        Request::VeHistory { name, .. } => (name, "history"),
        Request::VeRevert { name, .. } => (name, "revert"),
        Request::VeRollback { name, .. } => (name, "rollback"),
        Request::VeExport { name } => (name, "export"),
        Request::VeRescue { name, .. } => (name, "rescue"),
        Request::VeScrub { name, .. } => (name, "scrub"),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_and_freed_on_drop() {
        let active = Arc::new(AtomicUsize::new(0));
        let a = Slot::take(&active, 2).unwrap();
        let b = Slot::take(&active, 2).unwrap();
        assert!(Slot::take(&active, 2).is_none(), "a third connection is over the bound");
        drop(a);
        let c = Slot::take(&active, 2).expect("a freed slot is reused");
        drop((b, c));
        assert_eq!(active.load(Ordering::Acquire), 0);
    }

    #[test]
    fn busy_reply_is_an_error_the_client_reads() {
        let (a, b) = UnixStream::pair().unwrap();
        refuse_busy(a, &ApiSettings::default());
        let (r, _) = vessel_api::frame::read_frame::<Response>(b.as_raw_fd()).unwrap();
        match r {
            Response::Error(e) => {
                assert_eq!(e.code, ErrorCode::Busy);
                assert!(e.message.contains("busy"), "{}", e.message);
            }
            r => panic!("{r:?}"),
        }
    }
}
