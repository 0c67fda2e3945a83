//! A client's connection as the gRPC server reads and writes it: a unix stream watched
//! for reading only, and for writing only while a write waits for room.
//!
//! tokio's own `UnixStream` registers with the reactor for both directions, edge
//! triggered. A unix socket's sender is notified each time the peer reads from it, so
//! with that registration every answer the client reads wakes a parked worker of the
//! daemon, which finds nothing to do and parks again: one wake-up and two context
//! switches per call (seen with `strace`, where nearly every call's `writev` was
//! followed by an `epoll_wait` returning `EPOLLOUT` alone). Answers are small and the
//! socket's buffer almost never full, so the write side needs watching only when a
//! write would block: then a duplicate of the descriptor is registered for
//! writability (epoll keeps registrations per open descriptor, and a new one reports
//! the present state at once, so room made before it was added is not missed), and it
//! is dropped again once the write went through.
//!
//! A write that returned `Pending` promised its caller a wake-up once there is room.
//! tokio's own stream keeps that promise even if a later write goes through first: the
//! waker stays registered until the next edge. h2 counts on it: it may stop on a
//! blocked write before reading, write the rest on another path of the same poll, and
//! return `Pending` with no other waker registered. So dropping the duplicate wakes
//! whoever still waits on it (found as a hang: containerd's request unread in the
//! socket, the daemon idle, under a forced small send buffer).

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// One accepted connection; see the [module documentation](self).
pub struct Conn {
    stream: AsyncFd<UnixStream>,
    /// Watched while a write waits for room in the socket's buffer.
    room: Option<Room>,
}

/// A duplicate of the stream's descriptor watched for writability, and who waits on it.
struct Room {
    watched: AsyncFd<OwnedFd>,
    /// The waker of the last write told `Pending` and not yet woken by an edge: woken
    /// when the room is dropped, if nothing woke it before.
    waiting: Option<Waker>,
}

impl Drop for Room {
    fn drop(&mut self) {
        if let Some(waiting) = self.waiting.take() {
            waiting.wake();
        }
    }
}

impl Conn {
    /// Takes an accepted stream over from tokio's reactor. Must run inside the runtime.
    pub fn new(stream: tokio::net::UnixStream) -> io::Result<Conn> {
        // Deregistered from the reactor, still non-blocking.
        let stream = stream.into_std()?;
        Ok(Conn { stream: watch(stream, Interest::READABLE)?, room: None })
    }

    /// Writes with `write` if the socket has room; otherwise waits for room (watching
    /// a duplicate of the descriptor until there is) and tries again.
    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&UnixStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            match write(self.stream.get_ref()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                done => {
                    // Room again: stop watching, or each read of the client's would
                    // wake the daemon (dropping it wakes a write still waiting).
                    self.room = None;
                    return Poll::Ready(done);
                }
            }
            let room = match &mut self.room {
                Some(room) => room,
                None => {
                    let dup = self.stream.get_ref().as_fd().try_clone_to_owned()?;
                    let watched = watch(dup, Interest::WRITABLE)?;
                    self.room.insert(Room { watched, waiting: None })
                }
            };
            match room.watched.poll_write_ready(cx) {
                Poll::Pending => {
                    match &mut room.waiting {
                        Some(waiting) => waiting.clone_from(cx.waker()),
                        none => *none = Some(cx.waker().clone()),
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(mut ready)) => {
                    // The edge woke whoever waited.
                    room.waiting = None;
                    // Edge triggered: forget this readiness, so that the next wait is
                    // for a new edge if the write still finds no room.
                    ready.clear_ready();
                }
            }
        }
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("fd", &self.stream.get_ref().as_fd())
            .field("waiting_for_room", &self.room.is_some())
            .finish()
    }
}

/// `fd` registered with the runtime's reactor for `interest` only.
fn watch<T: AsRawFd>(fd: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: `T` is an owned descriptor (a `UnixStream` or an `OwnedFd`) that the
    // `AsyncFd` owns from here on: it stays open, and names the same open file, until
    // the `AsyncFd` is dropped; nothing here gives it out mutably or replaces it.
    #[allow(unsafe_code)]
    let watched = unsafe { AsyncFd::register_with_interest(fd, interest) };
    watched.map_err(|e| e.into_parts().1)
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut ready = ready!(this.stream.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let wanted = unfilled.len();
            match ready.try_io(|s| s.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    // Less than asked for: the socket is drained, so the next read
                    // waits for new data instead of making a call that would block
                    // (tokio's own streams do the same; data arriving meanwhile is a
                    // new edge, which this does not clear).
                    if n > 0 && n < wanted {
                        ready.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Would block: readiness cleared; wait for the next edge.
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, |mut s| s.write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, |mut s| s.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written straight to the socket: nothing buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shut = self.stream.get_ref().shutdown(std::net::Shutdown::Write);
        Poll::Ready(match shut {
            // The client went first: nothing left to shut.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            other => other,
        })
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ();

    fn connect_info(&self) {}
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::task::Waker;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
    }

    /// A connection's two ends: ours as the server has it, the client's as a blocking
    /// std stream.
    fn pair() -> (Conn, UnixStream) {
        let (ours, theirs) = tokio::net::UnixStream::pair().expect("socket pair");
        let theirs = theirs.into_std().expect("their end");
        theirs.set_nonblocking(false).expect("blocking");
        (Conn::new(ours).expect("watch our end"), theirs)
    }

    #[test]
    fn a_write_with_no_room_waits_for_the_client_to_read_and_then_stops_watching() {
        runtime().block_on(async {
            let (mut conn, theirs) = pair();
            let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
            // Fill the socket until a write would block: only then is room watched.
            let mut sent = 0;
            let mut cx = Context::from_waker(Waker::noop());
            assert!(conn.room.is_none());
            while let Poll::Ready(n) = Pin::new(&mut conn).poll_write(&mut cx, &data[sent..]) {
                sent += n.expect("write while there is room");
                assert!(conn.room.is_none(), "watching for room after a write that found it");
            }
            assert!(conn.room.is_some(), "a blocked write does not watch for room");
            assert!(sent < data.len(), "8 MiB fit in the socket's buffers");
            let reader = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                let mut got = Vec::new();
                (&theirs).read_to_end(&mut got).map(|_| got)
            });
            let rest = conn.write_all(&data[sent..]);
            tokio::time::timeout(Duration::from_secs(60), rest)
                .await
                .expect("a blocked write was never woken when the client read")
                .expect("write the rest");
            assert!(conn.room.is_none(), "still watching for room once the writes went through");
            conn.shutdown().await.expect("shut down our side");
            let got = reader.join().expect("reader").expect("read everything");
            assert_eq!(got.len(), data.len());
            assert!(got == data, "the bytes arrived changed or out of order");
        });
    }

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Woken(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Woken {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_write_told_to_wait_is_woken_even_if_a_later_write_finds_room_first() {
        runtime().block_on(async {
            let (mut conn, theirs) = pair();
            let woken = std::sync::Arc::new(Woken::default());
            let waker = Waker::from(woken.clone());
            let data = vec![7u8; 8 << 20];
            // Fill the socket until a write is told to wait, with `waker`.
            let mut sent = 0;
            while let Poll::Ready(n) =
                Pin::new(&mut conn).poll_write(&mut Context::from_waker(&waker), &data[sent..])
            {
                sent += n.expect("write while there is room");
            }
            assert!(conn.room.is_some(), "a blocked write does not watch for room");
            // The client reads it all; all of this runs in one poll of this task, so the
            // reactor has not seen the edge and woken anyone yet.
            let mut got = vec![0; sent];
            (&theirs).read_exact(&mut got).expect("read what was sent");
            // As h2 does: a write on another path of the same poll finds room first.
            let more =
                Pin::new(&mut conn).poll_write(&mut Context::from_waker(Waker::noop()), b"more");
            assert!(matches!(more, Poll::Ready(Ok(4))), "{more:?}");
            assert!(conn.room.is_none(), "still watching for room once a write went through");
            // The caller told to wait may have returned `Pending` counting on that
            // wake-up, with no other waker registered: it must come.
            assert_eq!(woken.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        });
    }

    #[test]
    fn reads_what_arrives_in_pieces_until_the_client_closes() {
        runtime().block_on(async {
            let (mut conn, theirs) = pair();
            let writer = std::thread::spawn(move || {
                for piece in [&b"first "[..], b"second ", b"third"] {
                    std::thread::sleep(Duration::from_millis(50));
                    (&theirs).write_all(piece)?;
                }
                Ok::<_, io::Error>(())
            });
            let mut got = Vec::new();
            tokio::time::timeout(Duration::from_secs(60), conn.read_to_end(&mut got))
                .await
                .expect("a read was never woken when data arrived")
                .expect("read");
            writer.join().expect("writer").expect("write the pieces");
            assert_eq!(got, b"first second third");
        });
    }

    #[test]
    fn writes_after_the_client_closed_fail_and_shutting_down_then_is_fine() {
        runtime().block_on(async {
            let (mut conn, theirs) = pair();
            drop(theirs);
            let e = conn.write_all(b"answer").await.expect_err("wrote to a closed socket");
            assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
            conn.shutdown().await.expect("shut down after the client left");
        });
    }
}
