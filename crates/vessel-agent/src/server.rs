//! The local API server: a Unix socket only root may open, one thread per connection,
//! requests dispatched to the [`Node`]. Malformed frames get an error reply, never a panic.

use crate::node::Node;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use vessel_api::frame::{read_frame, write_frame, FrameError};
use vessel_types::api::{ApiError, ErrorCode, Request, Response};

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

pub fn serve(node: Arc<Node>, listener: UnixListener) {
    for conn in listener.incoming() {
        match conn {
            Ok(c) => {
                let node = node.clone();
                let _ = std::thread::Builder::new()
                    .name("vessel-conn".into())
                    .spawn(move || handle(&node, c));
            }
            Err(e) => tracing::warn!("accept: {e}"),
        }
    }
}

fn reply(conn: &UnixStream, r: &Response) -> bool {
    write_frame(conn.as_raw_fd(), r, &[]).is_ok()
}

fn handle(node: &Arc<Node>, conn: UnixStream) {
    loop {
        let (req, fds) = match read_frame::<Request>(conn.as_raw_fd()) {
            Ok(x) => x,
            Err(FrameError::Closed) => return,
            Err(e @ (FrameError::Decode(_) | FrameError::Version(_) | FrameError::TooLarge(_))) => {
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
    Ok(Some(match req {
        Request::Status => Response::Status(node.status()),
        Request::TemplateBuild { kind, name } => Response::Template(node.template_build(kind, name, &mut progress)?),
        Request::TemplateList => Response::Templates {
            templates: node.template_list(),
        },
        Request::TemplateShow { name } => Response::Template(node.template_show(&name)?),
        Request::TemplateRemove { name } => {
            node.template_remove(&name)?;
            Response::Ok
        }
        Request::VeCreate { spec, start } => {
            let name = spec.name.clone();
            let info = node.create(spec)?;
            if start {
                progress("starting", 1, 2);
                match node.start(&name) {
                    Ok(v) => Response::Ve(Box::new(v)),
                    Err(mut e) => {
                        // Create and start were asked as one: leave nothing half-made.
                        if node.destroy(&name, true).is_ok() {
                            e.message.push_str(" (the VE was not created)");
                        }
                        return Err(e);
                    }
                }
            } else {
                Response::Ve(Box::new(info))
            }
        }
        Request::VeList => Response::Ves { ves: node.list() },
        Request::VeShow { name } => Response::Ve(Box::new(node.show(&name)?)),
        Request::VeStart { name } => Response::Ve(Box::new(node.start(&name)?)),
        Request::VeStop { name, timeout_secs } => {
            Response::Ve(Box::new(node.stop(&name, Duration::from_secs(timeout_secs))?))
        }
        Request::VeRestart { name, timeout_secs } => {
            Response::Ve(Box::new(node.restart(&name, Duration::from_secs(timeout_secs))?))
        }
        Request::VeDestroy { name, force } => {
            node.destroy(&name, force)?;
            Response::Ok
        }
        Request::VeSet { name, change } => Response::Ve(Box::new(node.set(&name, &change)?)),
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
        Request::VeLogs { name, tail_bytes } => Response::Logs {
            text: node.logs(&name, tail_bytes)?,
        },
        Request::VeDiff { name, path } => Response::Diff {
            entries: node.diff(&name, path.as_deref())?,
        },
        Request::VeHistory { name, path } => Response::History {
            entries: node.history(&name, &path)?,
        },
        Request::VeRevert { name, path, to } => Response::Reverted {
            changed: node.revert(&name, &path, to)?,
        },
        Request::VeRollback { name, to } => Response::Reverted {
            changed: node.rollback(&name, to)?,
        },
        Request::VeExport { name } => {
            let fd = fds
                .into_iter()
                .next()
                .ok_or_else(|| crate::node::err(ErrorCode::InvalidArgument, "export needs the output as an fd"))?;
            node.export(&name, fd)?;
            Response::Ok
        }
        Request::VeImport { name, start } => {
            let fd = fds
                .into_iter()
                .next()
                .ok_or_else(|| crate::node::err(ErrorCode::InvalidArgument, "import needs the input as an fd"))?;
            Response::Ve(Box::new(node.import(name, start, fd)?))
        }
        Request::VeRescue { name, end } => {
            node.rescue(&name, end)?;
            Response::Ve(Box::new(node.show(&name)?))
        }
    }))
}
