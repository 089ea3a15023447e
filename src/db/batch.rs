//! Reads by key, batched: the asks that arrive while reads are under way wait for the
//! next read, which answers all of them with one statement.
//!
//! Each read pays a round trip to Postgres and a statement's fixed cost (a wakeup of its
//! backend, a transaction, a snapshot) whatever the number of rows; under load, the keys
//! of many requests share them. Nothing waits for a batch to fill: an ask that finds a
//! read free goes at once, so a lone request is as fast as before, and batches grow only
//! as fast as reads come back.
//!
//! An answer is never older than its ask: a read covers only asks made before it
//! started, so a request that follows an acknowledged write sees it.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, Semaphore};

/// Most keys in one read.
pub const MAX_BATCH: usize = 64;

/// The future a read returns: the values found among the keys asked (any order, none for
/// a key that names nothing), or why it failed.
pub type ReadFuture<V, E> = Pin<Box<dyn Future<Output = Result<Vec<V>, E>> + Send>>;

type Read<K, V, E> = Arc<dyn Fn(Vec<K>) -> ReadFuture<V, E> + Send + Sync>;
type Ask<K, V, E> = (K, oneshot::Sender<Result<Option<V>, Arc<E>>>);

/// Batches asks for values of type `V` by key `K` into reads of up to [`MAX_BATCH`] keys,
/// with at most `in_flight` reads under way at once.
pub struct Batched<K, V, E> {
    read: Read<K, V, E>,
    key: fn(&V) -> K,
    in_flight: usize,
    /// The running batcher's inbox; started by the first ask, on that ask's runtime, and
    /// again if that runtime has gone.
    inbox: Mutex<Option<mpsc::UnboundedSender<Ask<K, V, E>>>>,
}

/// Why an ask has no answer.
#[derive(Debug)]
pub enum BatchError<E> {
    /// The read failed; every ask it covered shares its error.
    Read(Arc<E>),
    /// The batcher stopped before answering (its runtime is shutting down).
    Stopped,
}

impl<K, V, E> Batched<K, V, E>
where
    K: PartialEq + Copy + Send + 'static,
    V: Clone + Send + 'static,
    E: Send + Sync + 'static,
{
    /// Batches reads of `read`, which finds the values of the keys it is given; `key` is
    /// the key of a value it found.
    pub fn new(
        in_flight: usize,
        key: fn(&V) -> K,
        read: impl Fn(Vec<K>) -> ReadFuture<V, E> + Send + Sync + 'static,
    ) -> Self {
        Self {
            read: Arc::new(read),
            key,
            in_flight: in_flight.max(1),
            inbox: Mutex::new(None),
        }
    }

    /// The value of `key`, read together with the keys asked for while reads were under
    /// way; `None` when it names nothing.
    pub async fn get(&self, key: K) -> Result<Option<V>, BatchError<E>> {
        let (reply, answer) = oneshot::channel();
        self.send((key, reply))?;
        match answer.await {
            Ok(result) => result.map_err(BatchError::Read),
            Err(_) => Err(BatchError::Stopped),
        }
    }

    /// Hands `ask` to the running batcher, starting one when none runs.
    fn send(&self, ask: Ask<K, V, E>) -> Result<(), BatchError<E>> {
        let mut inbox = self
            .inbox
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let sender = match &*inbox {
            Some(sender) if !sender.is_closed() => sender,
            _ => {
                let (sender, receiver) = mpsc::unbounded_channel();
                tokio::spawn(batch(
                    receiver,
                    self.read.clone(),
                    self.key,
                    Arc::new(Semaphore::new(self.in_flight)),
                ));
                inbox.insert(sender)
            }
        };
        sender.send(ask).map_err(|_closed| BatchError::Stopped)
    }
}

/// Takes asks until every sender is gone: waits for a read to be free, then starts one
/// for all the asks waiting.
async fn batch<K, V, E>(
    mut inbox: mpsc::UnboundedReceiver<Ask<K, V, E>>,
    read: Read<K, V, E>,
    key: fn(&V) -> K,
    reads: Arc<Semaphore>,
) where
    K: PartialEq + Copy + Send + 'static,
    V: Clone + Send + 'static,
    E: Send + Sync + 'static,
{
    while let Some(first) = inbox.recv().await {
        let Ok(permit) = reads.clone().acquire_owned().await else {
            return;
        };
        // Asks that came while every read was busy join this one.
        let mut asks = vec![first];
        while asks.len() < MAX_BATCH {
            match inbox.try_recv() {
                Ok(ask) => asks.push(ask),
                Err(_) => break,
            }
        }
        let keys: Vec<K> = asks.iter().map(|(k, _)| *k).collect();
        let read = read(keys);
        tokio::spawn(async move {
            let result = read.await.map_err(Arc::new);
            drop(permit);
            answer(asks, result, key);
        });
    }
}

/// Hands each ask its value, none, or the read's error.
fn answer<K: PartialEq + Copy, V: Clone, E>(
    asks: Vec<Ask<K, V, E>>,
    result: Result<Vec<V>, Arc<E>>,
    key: fn(&V) -> K,
) {
    for (wanted, reply) in asks {
        let answer = match &result {
            Ok(found) => Ok(found.iter().find(|value| key(value) == wanted).cloned()),
            Err(error) => Err(error.clone()),
        };
        // The asker may have gone (its request timed out); the others are still answered.
        let _ = reply.send(answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// A store of (key, version) pairs whose reads take `delay` and are counted; each read
    /// sees the version current when it started.
    struct Store {
        version: AtomicUsize,
        reads: AtomicUsize,
        keys_read: Mutex<Vec<usize>>,
    }

    type Test = Batched<u32, (u32, usize), String>;
    type Answer = Result<Option<(u32, usize)>, BatchError<String>>;

    /// A new store, and a batcher of its reads with `in_flight` under way at most.
    fn batched(delay: Duration, in_flight: usize) -> (Arc<Store>, Arc<Test>) {
        let store = Arc::new(Store {
            version: AtomicUsize::new(0),
            reads: AtomicUsize::new(0),
            keys_read: Mutex::new(Vec::new()),
        });
        let reads = store.clone();
        let batched = Batched::new(
            in_flight,
            |value: &(u32, usize)| value.0,
            move |keys: Vec<u32>| {
                let store = reads.clone();
                Box::pin(async move {
                    let version = store.version.load(Ordering::SeqCst);
                    store.reads.fetch_add(1, Ordering::SeqCst);
                    store.keys_read.lock().unwrap().push(keys.len());
                    tokio::time::sleep(delay).await;
                    if keys.contains(&666) {
                        return Err("the database is on fire".to_string());
                    }
                    // Odd keys name nothing.
                    Ok(keys
                        .into_iter()
                        .filter(|k| k % 2 == 0)
                        .map(|k| (k, version))
                        .collect())
                }) as ReadFuture<(u32, usize), String>
            },
        );
        (store, Arc::new(batched))
    }

    /// Asks for `key` from a task of its own.
    fn ask(batched: &Arc<Test>, key: u32) -> tokio::task::JoinHandle<Answer> {
        let batched = batched.clone();
        tokio::spawn(async move { batched.get(key).await })
    }

    #[tokio::test]
    async fn asks_made_while_a_read_is_under_way_share_the_next_read() {
        let (store, batched) = batched(Duration::from_millis(50), 1);
        let asks: Vec<_> = (0..40u32).map(|k| (k, ask(&batched, k))).collect();
        for (k, answer) in asks {
            let answer = answer.await.unwrap().unwrap();
            if k % 2 == 0 {
                assert_eq!(answer.map(|v| v.0), Some(k), "key {k} got another's value");
            } else {
                assert_eq!(answer, None, "key {k} names nothing");
            }
        }
        let reads = store.reads.load(Ordering::SeqCst);
        assert!(reads <= 2, "40 asks at once took {reads} reads");
    }

    #[tokio::test]
    async fn a_lone_ask_does_not_wait_for_company() {
        let (store, batched) = batched(Duration::ZERO, 2);
        for k in [2u32, 4, 6] {
            let started = tokio::time::Instant::now();
            assert_eq!(batched.get(k).await.unwrap().map(|v| v.0), Some(k));
            assert!(started.elapsed() < Duration::from_millis(500));
        }
        assert_eq!(*store.keys_read.lock().unwrap(), vec![1, 1, 1]);
    }

    #[tokio::test]
    async fn an_answer_is_never_older_than_its_ask() {
        let (store, batched) = batched(Duration::from_millis(100), 1);
        // A read starts at version 0 and is still under way when the write lands.
        let early = ask(&batched, 2);
        tokio::time::sleep(Duration::from_millis(20)).await;
        store.version.store(1, Ordering::SeqCst);
        let late = batched.get(2).await.unwrap().unwrap();
        assert_eq!(early.await.unwrap().unwrap().unwrap().1, 0);
        assert_eq!(
            late.1, 1,
            "an ask after the write was answered by a read from before it"
        );
    }

    #[tokio::test]
    async fn a_failed_read_fails_every_ask_it_covered_and_the_next_read_still_runs() {
        let (_, batched) = batched(Duration::from_millis(50), 1);
        let blocker = ask(&batched, 0);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let doomed: Vec<_> = [666u32, 2].into_iter().map(|k| ask(&batched, k)).collect();
        blocker.await.unwrap().unwrap();
        for ask in doomed {
            match ask.await.unwrap() {
                Err(BatchError::Read(error)) => assert_eq!(*error, "the database is on fire"),
                other => panic!("expected the read's error, got {other:?}"),
            }
        }
        assert_eq!(batched.get(4).await.unwrap().map(|v| v.0), Some(4));
    }

    #[tokio::test]
    async fn a_dropped_ask_leaves_the_others_answered() {
        let (_, batched) = batched(Duration::from_millis(50), 1);
        let gone = ask(&batched, 8);
        let kept = ask(&batched, 10);
        tokio::time::sleep(Duration::from_millis(5)).await;
        gone.abort();
        assert_eq!(kept.await.unwrap().unwrap().map(|v| v.0), Some(10));
        assert_eq!(batched.get(12).await.unwrap().map(|v| v.0), Some(12));
    }

    #[test]
    fn a_batcher_whose_runtime_ended_starts_again_on_the_next() {
        let (_, batched) = batched(Duration::ZERO, 1);
        for _ in 0..2 {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let answer = runtime.block_on(batched.get(2)).unwrap();
            assert_eq!(answer.map(|v| v.0), Some(2));
        }
    }
}
