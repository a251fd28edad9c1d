use super::*;
use crate::ZmqMessage;
use futures::SinkExt;

/// A writer that takes a varying number of bytes per call, across buffers when it
/// is given several (or only from the first, as `AsyncWrite`'s default does), is
/// sometimes not ready, and records where each buffer it was handed lives.
struct ChoppyWrite {
    bytes: Arc<Mutex<Vec<u8>>>,
    addresses: Arc<Mutex<Vec<usize>>>,
    state: u64,
    vectored: bool,
}

impl ChoppyWrite {
    fn next(&mut self) -> u64 {
        self.state = self
            .state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.state >> 33
    }
}

impl AsyncWrite for ChoppyWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buffer: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buffer)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buffers: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.next() % 5 == 0 {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let buffers = if self.vectored {
            buffers
        } else {
            &buffers[..buffers.len().min(1)]
        };
        let mut budget = 1 + (self.next() % 20_000) as usize;
        let mut written = 0;
        for buffer in buffers {
            self.addresses
                .lock()
                .unwrap()
                .push(buffer.as_ptr() as usize);
            let take = buffer.len().min(budget);
            self.bytes
                .lock()
                .unwrap()
                .extend_from_slice(&buffer[..take]);
            written += take;
            budget -= take;
            if budget == 0 {
                break;
            }
        }
        Poll::Ready(Ok(written))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn part(length: usize, seed: usize) -> Bytes {
    Bytes::from(
        (0..length)
            .map(|i| (i * 31 + seed) as u8)
            .collect::<Vec<_>>(),
    )
}

/// Whatever the parts and however the socket takes them, the writer puts on the
/// wire exactly the bytes the codec encodes, and writes large parts from the
/// message's own memory.
#[crate::async_rt::test]
async fn writes_what_the_codec_encodes_and_large_parts_in_place() {
    let lengths = [0, 1, 255, 256, 8191, 8192, 8193, 70_000, 300_000];
    for vectored in [true, false] {
        for case in 0..40usize {
            let mut messages = Vec::new();
            for m in 0..1 + case % 4 {
                let parts = 1 + (case + m) % 3;
                let mut message =
                    ZmqMessage::from(part(lengths[(case * 7 + m) % lengths.len()], m));
                for p in 1..parts {
                    message.push_back(part(lengths[(case + 3 * p + m) % lengths.len()], p));
                }
                messages.push(message);
            }
            let mut expected = BytesMut::new();
            let mut codec = ZmqCodec::new();
            codec
                .encode(Message::Greeting(ZmqGreeting::default()), &mut expected)
                .unwrap();
            for message in &messages {
                codec
                    .encode(Message::Message(message.clone()), &mut expected)
                    .unwrap();
            }

            let bytes = Arc::new(Mutex::new(Vec::new()));
            let addresses = Arc::new(Mutex::new(Vec::new()));
            let writer = ChoppyWrite {
                bytes: bytes.clone(),
                addresses: addresses.clone(),
                state: case as u64,
                vectored,
            };
            let mut sink = ZmqFramedWrite::new(Box::new(writer), ZmqCodec::new());
            sink.send(Message::Greeting(ZmqGreeting::default()))
                .await
                .unwrap();
            for message in &messages {
                sink.feed(Message::Message(message.clone())).await.unwrap();
            }
            sink.flush().await.unwrap();
            assert_eq!(*bytes.lock().unwrap(), expected.to_vec(), "case {case}");

            let addresses = addresses.lock().unwrap();
            for message in &messages {
                for part in message.iter().filter(|p| p.len() >= WRITE_IN_PLACE_AT) {
                    assert!(
                        addresses.contains(&(part.as_ptr() as usize)),
                        "a part of {} bytes was copied before it was written",
                        part.len()
                    );
                }
            }
        }
    }
}
