//! Handing a batch of answers from a thread of keyward's own (a pool
//! worker, the signature log's writer) to the tasks waiting for them.
//!
//! Completing a oneshot wakes its task. Woken from outside the runtime, a
//! tokio task goes to the runtime's shared queue and a parked runtime thread
//! is woken for it; on a host whose cores keyward's threads keep busy, that
//! thread preempts the answering thread at once, runs the one task, finds
//! nothing else and parks again before the next answer is out. Measured
//! with `perf sched` on 2 cores: four context switches per answer, a pool
//! batch's sixteen answers taking 0.4 ms to hand out instead of a few
//! microseconds, and the signature log's last answers of a commit waiting
//! milliseconds behind the first. So a whole batch goes to one task on the
//! runtime (one cross-thread wake-up), which completes the answers from
//! there, where waking a task is a push onto the runtime's own queue.

use tokio::sync::{mpsc, oneshot};

/// An answer and where it goes.
pub type Answer<T> = (oneshot::Sender<T>, T);

pub enum Handoff<T> {
    Dispatcher(mpsc::UnboundedSender<Vec<Answer<T>>>),
    /// Created outside a runtime: the answering thread completes each
    /// answer itself.
    Direct,
}

impl<T: Send + 'static> Handoff<T> {
    /// A dispatcher task on the runtime this is called from, if any. Call
    /// it where the waiting tasks run, not on the answering thread.
    pub fn start() -> Self {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Handoff::Direct;
        };
        let (batches, mut receiver) = mpsc::unbounded_channel::<Vec<Answer<T>>>();
        // Ends when the sending side is dropped, or with the runtime;
        // answers still in the channel are then dropped, which their
        // callers see as a closed channel.
        runtime.spawn(async move {
            while let Some(batch) = receiver.recv().await {
                complete(batch);
            }
        });
        Handoff::Dispatcher(batches)
    }

    pub fn deliver(&self, answers: Vec<Answer<T>>) {
        if answers.is_empty() {
            return;
        }
        match self {
            Handoff::Dispatcher(batches) => {
                // Refused only once the runtime is gone: nobody is waiting.
                let _ = batches.send(answers);
            }
            Handoff::Direct => complete(answers),
        }
    }
}

fn complete<T>(answers: Vec<Answer<T>>) {
    for (reply, answer) in answers {
        // The caller may have gone away; nobody is left to tell.
        let _ = reply.send(answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers(n: u32) -> (Vec<Answer<u32>>, Vec<oneshot::Receiver<u32>>) {
        (0..n)
            .map(|i| {
                let (reply, waiting) = oneshot::channel();
                ((reply, i), waiting)
            })
            .unzip()
    }

    #[tokio::test]
    async fn on_a_runtime_each_answer_reaches_its_own_caller_through_the_dispatcher() {
        let handoff = Handoff::start();
        assert!(matches!(handoff, Handoff::Dispatcher(_)));
        let (batch, waiting) = answers(16);
        // From another thread, as a pool worker would.
        std::thread::spawn(move || handoff.deliver(batch))
            .join()
            .unwrap();
        for (i, answer) in waiting.into_iter().enumerate() {
            assert_eq!(answer.await.unwrap(), i as u32);
        }
    }

    #[test]
    fn outside_a_runtime_the_answering_thread_completes_the_answers() {
        let handoff = Handoff::start();
        assert!(matches!(handoff, Handoff::Direct));
        let (batch, waiting) = answers(3);
        handoff.deliver(batch);
        for (i, mut answer) in waiting.into_iter().enumerate() {
            assert_eq!(answer.try_recv().unwrap(), i as u32);
        }
    }
}
