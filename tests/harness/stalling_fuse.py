# A FUSE server for the integration tests (harness/fuse.rs), speaking /dev/fuse directly: one file
# "client" (a copy of argv[2]) at mount point argv[1]. GETATTR requests from
# pid argv[3] (the daemon) are never answered, nor is any POLL (so an
# epoll_ctl(ADD) of the file waits, holding its epoll's lock; "poll" is
# printed as each arrives, when that lock is held). Prints
# "mounted" once mounted. With argv[4] "stall-ioctl", no IOCTL is answered
# either, and "ioctl" is printed as each arrives; with "stall-flush", no
# FLUSH (sent at every close(2) of the file), and "flush" is printed.
import os, sys, struct, ctypes, errno
mnt, src, stall_pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
stall_ioctl = len(sys.argv) > 4 and sys.argv[4] == "stall-ioctl"
stall_flush = len(sys.argv) > 4 and sys.argv[4] == "stall-flush"
# Read as asked, not up front: the testclient is a debug build of 100 MB
# and more, and reading it whole over the VM's 9p delayed "mounted" past the
# harness's patience on a slow machine.
src_fd = os.open(src, os.O_RDONLY)
src_size = os.fstat(src_fd).st_size
fd = os.open('/dev/fuse', os.O_RDWR)
libc = ctypes.CDLL(None, use_errno=True)
opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
if libc.mount(b"rvfuse", mnt.encode(), b"fuse", 0, opts) != 0:
    raise OSError(ctypes.get_errno(), "mount")
print("mounted", flush=True)
def attr(ino):
    if ino == 1:
        mode, size, nlink = 0o40755, 0, 2
    else:
        mode, size, nlink = 0o100755, src_size, 1
    return struct.pack("<QQQQQQIIIIIIIIII", ino, size, (size+511)//512, 0,0,0, 0,0,0, mode, nlink, 0,0,0, 4096, 0)
def reply(unique, err=0, body=b""):
    os.write(fd, struct.pack("<IiQ", 16+len(body), -err, unique) + body)
while True:
    try:
        req = os.read(fd, (1 << 20) + 4096)
    except OSError as e:
        if e.errno in (errno.EINTR, errno.ENOENT): continue
        break
    ln, op, unique, node, uid, gid, pid = struct.unpack_from("<IIQQIII", req)
    arg = req[40:ln]
    if op == 26:  # INIT
        maj, mnr, ra, fl = struct.unpack_from("<IIII", arg)
        reply(unique, 0, struct.pack("<IIIIHHIIHHII", 7, 31, ra, 0, 16, 12, 1 << 17, 1, 32, 0, 0, 0) + b"\0" * 24)
    elif op == 1:  # LOOKUP
        name = arg.split(b"\0")[0]
        if node == 1 and name == b"client":
            reply(unique, 0, struct.pack("<QQQQII", 2, 0, 0, 0, 0, 0) + attr(2))
        else:
            reply(unique, errno.ENOENT)
    elif op == 3:  # GETATTR
        if stall_pid and pid == stall_pid:
            continue  # never answered
        reply(unique, 0, struct.pack("<QII", 0, 0, 0) + attr(node))
    elif op in (14, 27):  # OPEN, OPENDIR
        reply(unique, 0, struct.pack("<QIi", 0, 0, 0))
    elif op == 15:  # READ
        fh, off, size = struct.unpack_from("<QQI", arg)
        reply(unique, 0, os.pread(src_fd, size, off))
    elif op == 40:  # POLL: never answered
        print("poll", flush=True)
        continue
    elif op == 39 and stall_ioctl:  # IOCTL
        print("ioctl", flush=True)
        continue
    elif op == 25 and stall_flush:  # FLUSH
        print("flush", flush=True)
        continue
    elif op in (2, 42):  # FORGET: no reply
        pass
    elif op in (18, 29, 25):  # RELEASE, RELEASEDIR, FLUSH
        reply(unique, 0)
    else:
        reply(unique, errno.ENOSYS)
