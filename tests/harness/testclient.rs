//! `dmabroker-testclient`: a real client process for the integration tests,
//! driven by one command per line on stdin, answering one line on stdout:
//! `ok key=value ...` or `err CODE message`.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use dmabroker_client::{Access, AccessGuard, AllocRequest, Buffer, Client, ClientOptions, Error};

struct Session {
    client: Client,
    /// The broker's socket, for commands that open a raw connection.
    socket: std::path::PathBuf,
    buffers: HashMap<u64, Buffer>,
    guards: HashMap<u64, AccessGuard>,
    /// Names for accesses held in buffer words, which have no broker id
    /// (`access=` in answers): counted down from the top, never a real id.
    next_word_access: u64,
    /// Files `adopt-file` opened, kept open until the process ends: the
    /// close of a FUSE file whose FLUSH is held would wait for good here.
    kept_files: Vec<OwnedFd>,
}

fn parse_access(word: &str) -> Result<Access, String> {
    Ok(match word {
        "cpu-read" | "r" => Access::CpuRead,
        "cpu-write" | "w" => Access::CpuWrite,
        "cpu-read-write" | "rw" => Access::CpuReadWrite,
        "device-read" | "dr" => Access::DeviceRead,
        "device-write" | "dw" => Access::DeviceWrite,
        other => return Err(format!("unknown access {other}")),
    })
}

fn num(word: Option<&str>) -> Result<u64, String> {
    word.ok_or("missing number")?
        .parse()
        .map_err(|e| format!("bad number: {e}"))
}

fn describe(buffer: &Buffer) -> String {
    format!(
        "id={} size={} inode={} heap={} fd={}",
        buffer.id(),
        buffer.size(),
        buffer.inode(),
        buffer.heap(),
        buffer.as_fd().as_raw_fd()
    )
}

fn describe_guard(guard: &AccessGuard, name: u64) -> String {
    let fences: Vec<String> = guard
        .fences()
        .iter()
        .map(|f| {
            format!(
                "{}:{}:{}:{}",
                f.id,
                f.holder,
                f.kind.name(),
                f.sync_file.is_some()
            )
        })
        .collect();
    format!(
        "access={} word={} writer_lost={} revoked={} fences={} fence_list={}",
        name,
        guard.in_word(),
        guard.writer_lost(),
        guard.revoked(),
        guard.fences().len(),
        fences.join(",")
    )
}

/// Whether a sync_file has signalled, by `poll(POLLIN)` with no wait:
/// `pending` or `signalled`.
fn sync_file_state(sync_file: BorrowedFd<'_>) -> Result<&'static str, String> {
    let mut fds = [nix::poll::PollFd::new(
        sync_file,
        nix::poll::PollFlags::POLLIN,
    )];
    let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO)
        .map_err(|e| format!("err Other poll: {e}"))?;
    Ok(if ready > 0 { "signalled" } else { "pending" })
}

/// `struct dma_buf_export_sync_file` (include/uapi/linux/dma-buf.h).
#[repr(C)]
struct DmaBufExportSyncFile {
    flags: u32,
    fd: i32,
}

/// `DMA_BUF_IOCTL_EXPORT_SYNC_FILE = _IOWR('b', 2, struct dma_buf_export_sync_file)`.
const DMA_BUF_IOCTL_EXPORT_SYNC_FILE: libc::c_ulong = 0xc008_6202;
const DMA_BUF_SYNC_READ: u32 = 1;
const DMA_BUF_SYNC_WRITE: u32 = 2;

/// The dma-buf's current implicit fences as a sync_file: those a reader
/// waits for (`write == false`) or those a writer waits for.
fn export_sync_file(dmabuf: BorrowedFd<'_>, write: bool) -> Result<OwnedFd, String> {
    let mut arg = DmaBufExportSyncFile {
        flags: if write {
            DMA_BUF_SYNC_WRITE
        } else {
            DMA_BUF_SYNC_READ
        },
        fd: -1,
    };
    // SAFETY: the ioctl takes a pointer to a `struct
    // dma_buf_export_sync_file`, which `DmaBufExportSyncFile` mirrors; `arg`
    // is alive and exclusively borrowed for the call and `dmabuf` is open.
    let rc = unsafe { libc::ioctl(dmabuf.as_raw_fd(), DMA_BUF_IOCTL_EXPORT_SYNC_FILE, &mut arg) };
    if rc != 0 || arg.fd < 0 {
        return Err(format!(
            "err Other DMA_BUF_IOCTL_EXPORT_SYNC_FILE: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: on success the kernel installed the new sync_file descriptor
    // `arg.fd` in this process; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(arg.fd) })
}

impl Session {
    fn buffer(&self, id: u64) -> Result<&Buffer, String> {
        self.buffers
            .get(&id)
            .ok_or_else(|| format!("err NoSuchBuffer {id}"))
    }

    fn run(&mut self, line: &str) -> Result<String, String> {
        let mut words = line.split_whitespace();
        let command = words.next().unwrap_or("");
        let broker = |e: Error| match e.code() {
            Some(code) => format!("err {code} {e}"),
            None => format!("err Other {e}"),
        };
        match command {
            "alloc" => {
                let size = num(words.next())?;
                let mut request = AllocRequest {
                    size,
                    ..Default::default()
                };
                for w in words {
                    if let Some(h) = w.strip_prefix("heap=") {
                        request.heap = Some(h.to_owned());
                    } else if let Some(n) = w.strip_prefix("name=") {
                        request.name = Some(n.to_owned());
                    }
                }
                let buffer = self.client.alloc_with(request).map_err(broker)?;
                let out = describe(&buffer);
                self.buffers.insert(buffer.id(), buffer);
                Ok(out)
            }
            // Adopts a dma-buf fd this process inherited (see
            // `Scripted::spawn_as_with_fd`).
            "adopt-inherited" => {
                let raw = i32::try_from(num(words.next())?).map_err(|e| e.to_string())?;
                nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_GETFD)
                    .map_err(|e| format!("err Other fd {raw} is not open: {e}"))?;
                // SAFETY: the parent left `raw` open for this command (it was
                // just checked to be open), and nothing else in this process
                // refers to it.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                let buffer = self
                    .client
                    .adopt(fd, None)
                    .map_err(|refused| broker(refused.error))?;
                let out = describe(&buffer);
                self.buffers.insert(buffer.id(), buffer);
                Ok(out)
            }
            // Opens a file and asks the broker to adopt it: a file that is
            // no dma-buf is refused, and the broker closes its copy on its
            // closing thread for this process's user. This process keeps
            // its own copy open (see `kept_files`).
            "adopt-file" => {
                let path = words.next().ok_or("missing path")?;
                let file = std::fs::File::open(path)
                    .map_err(|e| format!("err Other cannot open {path}: {e}"))?;
                match self.client.adopt(file.into(), None) {
                    Ok(buffer) => {
                        let out = describe(&buffer);
                        self.buffers.insert(buffer.id(), buffer);
                        Ok(out)
                    }
                    Err(refused) => {
                        self.kept_files.push(refused.dmabuf);
                        Err(broker(refused.error))
                    }
                }
            }
            "export" => {
                let token = self.buffer(num(words.next())?)?.export().map_err(broker)?;
                Ok(format!("token={token}"))
            }
            "import" => {
                let token = words.next().ok_or("missing token")?;
                let token = token.parse().map_err(|e| format!("err Malformed {e}"))?;
                let buffer = self.client.import(&token).map_err(broker)?;
                let out = describe(&buffer);
                self.buffers.insert(buffer.id(), buffer);
                Ok(out)
            }
            "free" => {
                let id = num(words.next())?;
                self.buffers
                    .remove(&id)
                    .ok_or_else(|| format!("err NoSuchBuffer {id}"))?;
                Ok(String::new())
            }
            "info" => {
                let info = self.buffer(num(words.next())?)?.info().map_err(broker)?;
                Ok(format!(
                    "id={} size={} heap={} name={} inode={}",
                    info.id, info.size, info.heap, info.name, info.inode
                ))
            }
            "default-heap" => Ok(format!("default_heap={}", self.client.default_heap())),
            "heaps" => {
                let heaps = self.client.heaps().map_err(broker)?;
                let names: Vec<String> = heaps
                    .iter()
                    .map(|h| format!("{}:{}", h.name, h.backend))
                    .collect();
                Ok(format!("heaps={}", names.join(",")))
            }
            "write" | "read" => {
                let id = num(words.next())?;
                let buffer = self.buffer(id)?;
                let access = if command == "write" {
                    Access::CpuWrite
                } else {
                    Access::CpuRead
                };
                let mut guard = buffer.begin(access).map_err(broker)?;
                let lost = guard.writer_lost();
                if command == "write" {
                    let byte = num(words.next())? as u8;
                    guard.bytes_mut().map_err(broker)?.fill(byte);
                    Ok(format!("writer_lost={lost}"))
                } else {
                    let bytes = guard.bytes().map_err(broker)?;
                    let first = bytes.first().copied().unwrap_or(0);
                    let uniform = bytes.iter().all(|b| *b == first);
                    Ok(format!("byte={first} uniform={uniform} writer_lost={lost}"))
                }
            }
            "begin" => {
                let id = num(words.next())?;
                let access = parse_access(words.next().ok_or("missing access")?)?;
                let timeout = words
                    .next()
                    .map(|w| w.parse::<u64>())
                    .transpose()
                    .map_err(|e| e.to_string())?;
                let buffer = self.buffer(id)?;
                let guard = match timeout {
                    Some(ms) => buffer.begin_timeout(access, Duration::from_millis(ms)),
                    None => buffer.begin(access),
                }
                .map_err(broker)?;
                let name = match guard.id() {
                    0 => {
                        self.next_word_access -= 1;
                        self.next_word_access
                    }
                    id => id,
                };
                let out = describe_guard(&guard, name);
                self.guards.insert(name, guard);
                Ok(out)
            }
            // Uses up this process's mappings (`vm.max_map_count`), as a
            // program that maps a great many things does: every `mmap` from
            // here on fails `ENOMEM`. Kept to the process's end.
            "exhaust-mappings" => {
                use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};
                let page = std::num::NonZeroUsize::new(4096).ok_or("page size")?;
                let mut count = 0u64;
                loop {
                    // Alternate protections, so no two neighbours merge.
                    let prot = if count.is_multiple_of(2) {
                        ProtFlags::PROT_READ
                    } else {
                        ProtFlags::PROT_NONE
                    };
                    // SAFETY: a fresh anonymous mapping, never touched and
                    // never unmapped (it lives until the process exits).
                    match unsafe { mmap_anonymous(None, page, prot, MapFlags::MAP_PRIVATE) } {
                        Ok(_) => count += 1,
                        Err(_) => break,
                    }
                }
                Ok(format!("mappings={count}"))
            }
            "fill" => {
                let access = num(words.next())?;
                let byte = num(words.next())? as u8;
                let guard = self.guards.get_mut(&access).ok_or("err NoSuchAccess")?;
                guard.bytes_mut().map_err(broker)?.fill(byte);
                Ok(String::new())
            }
            "fences" => {
                // The held access's fences, each `id:holder:state` where
                // state is `pending` or `signalled` for a fence with a
                // sync_file (polled now) and `none` for one without.
                let access = num(words.next())?;
                let guard = self.guards.get(&access).ok_or("err NoSuchAccess")?;
                let mut states = Vec::new();
                for f in guard.fences() {
                    let state = match &f.sync_file {
                        Some(sync_file) => sync_file_state(sync_file.as_fd())?,
                        None => "none",
                    };
                    states.push(format!("{}:{}:{state}", f.id, f.holder));
                }
                Ok(format!(
                    "fences={} sync_files={}",
                    states.len(),
                    states.join(",")
                ))
            }
            "export-sync-file" => {
                // DMA_BUF_IOCTL_EXPORT_SYNC_FILE on this process's fd of the
                // buffer: are the kernel's implicit fences pending?
                let buffer = self.buffer(num(words.next())?)?;
                let write = match words.next() {
                    Some("r") => false,
                    Some("w") => true,
                    other => return Err(format!("err Malformed access {other:?}: r or w")),
                };
                let sync_file = export_sync_file(buffer.as_fd(), write)?;
                Ok(format!("state={}", sync_file_state(sync_file.as_fd())?))
            }
            "end" => {
                let access = num(words.next())?;
                let guard = self.guards.remove(&access).ok_or("err NoSuchAccess")?;
                guard.end().map_err(broker)?;
                // Make the pipelined end observable: a round trip after it.
                self.client.heaps().map_err(broker)?;
                Ok(String::new())
            }
            "end-with-non-fence" => {
                // Ends the access with a pipe where a sync_file belongs. The
                // broker refuses it; the guard comes back and stays held
                // under the same name, as a caller would keep it.
                let access = num(words.next())?;
                let guard = self.guards.remove(&access).ok_or("err NoSuchAccess")?;
                let (not_a_fence, _writer) = nix::unistd::pipe().map_err(|e| e.to_string())?;
                match guard.end_with_fence(not_a_fence) {
                    Ok(()) => Ok(String::new()),
                    Err(refused) => {
                        let answer = match refused.code() {
                            Some(code) => format!("err {code} {}", refused.error),
                            None => format!("err Other {}", refused.error),
                        };
                        self.guards.insert(access, *refused.guard);
                        Err(answer)
                    }
                }
            }
            // A re-attach on a raw connection of this process (its uid),
            // with a secret the test got elsewhere: what the broker answers.
            "raw-reattach" => {
                let buffer = num(words.next())?;
                let secret = words.next().unwrap_or("").to_owned();
                let mut raw = dmabroker_suite::raw::RawClient::connect(&self.socket);
                raw.hello();
                match raw.request(dmabroker_ipc::RequestBody::Reattach { buffer, secret }) {
                    Ok(dmabroker_ipc::ReplyBody::Buffer(info)) => Ok(format!("id={}", info.id)),
                    Ok(other) => Err(format!("err Other {other:?}")),
                    Err(code) => Err(format!("err {code} re-attach refused")),
                }
            }
            "event" => {
                let ms = num(words.next())?;
                match self
                    .client
                    .next_event(Some(Duration::from_millis(ms)))
                    .map_err(broker)?
                {
                    Some(event) => Ok(format!("event={event:?}")),
                    None => Err("err NoEvent".into()),
                }
            }
            "errors" => {
                let errors = self.client.take_errors();
                let codes: Vec<String> = errors.iter().map(|e| e.code.to_string()).collect();
                Ok(format!("count={} codes={}", errors.len(), codes.join(",")))
            }
            "sleep" => {
                std::thread::sleep(Duration::from_millis(num(words.next())?));
                Ok(String::new())
            }
            other => Err(format!("err UnknownCommand {other}")),
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut socket = None;
    let mut options = ClientOptions {
        name: "testclient".into(),
        ..Default::default()
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--socket" => socket = args.next(),
            "--no-autofence" => options.autofence = Some(false),
            "--autofence" => options.autofence = Some(true),
            "--no-buffer-words" => options.buffer_words = false,
            other => {
                eprintln!("testclient: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let path = socket
        .map(std::path::PathBuf::from)
        .unwrap_or_else(dmabroker_ipc::paths::client_socket);
    let client = match Client::connect_with(&path, options) {
        Ok(client) => client,
        Err(e) => {
            let code = e
                .code()
                .map(|c| c.to_string())
                .unwrap_or_else(|| "Other".into());
            let _ = writeln!(out, "err {code} {e}");
            return;
        }
    };
    let _ = writeln!(
        out,
        "ready client={} autofence={}",
        client.id(),
        client.autofence()
    );
    let _ = out.flush();
    let mut session = Session {
        client,
        socket: path.clone(),
        buffers: HashMap::new(),
        guards: HashMap::new(),
        next_word_access: u64::MAX,
        kept_files: Vec::new(),
    };
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim() == "exit" {
            break;
        }
        let answer = match session.run(&line) {
            Ok(rest) if rest.is_empty() => "ok".to_owned(),
            Ok(rest) => format!("ok {rest}"),
            Err(err) => err,
        };
        let _ = writeln!(out, "{answer}");
        let _ = out.flush();
    }
}
