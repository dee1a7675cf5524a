//! The target writer on a task of its own, so that the stream is read, decoded and mapped
//! while the previous batch is being written: the two halves of the pipeline overlap, and
//! the source keeps getting status updates whatever the target is doing.
//!
//! Jobs run one at a time, in the order they are sent, and each is answered in that order.
//! After a failed job the worker stops: its connection is dropped with the task, so the
//! server rolls back whatever was not committed.

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::batch::{Batch, CommitPosition};
use super::writer::TargetWriter;
use super::ApplyError;
use crate::lsn::Lsn;

/// What the worker is asked to do.
#[derive(Debug)]
pub enum Job {
    /// Apply a batch and commit it with its checkpoint.
    Commit(Batch),
    /// [`Job::Commit`], in a target transaction that holds the checkpoint row from its start
    /// ([`TargetWriter::begin_holding_checkpoint`]), so that another worker can write the
    /// batch after it beside it. Answered twice: [`Done::HoldingCheckpoint`] first.
    CommitHolding(Batch),
    /// Apply a batch beside the one ending at this position, being written by another
    /// worker that holds the checkpoint row, and commit it once that one has committed
    /// ([`TargetWriter::apply_after`]). Answered twice when that one committed:
    /// [`Done::HoldingCheckpoint`] once this one holds the row in turn.
    CommitAfter(Batch, Lsn),
    /// Apply part of a large transaction and leave the target transaction open.
    Part(Batch),
    /// Roll back the target transaction a [`Job::Part`] left open.
    Abandon,
    /// Make everything committed so far durable, and record an idle position with it
    /// ([`TargetWriter::make_durable`]).
    MakeDurable(Option<Lsn>),
    /// Make everything committed so far durable without the checkpoint row, beside the
    /// worker that writes ([`TargetWriter::sync_wal`]).
    SyncWal,
}

/// The answer to a [`Job`].
#[derive(Debug)]
pub enum Done {
    Committed {
        /// Boxed: the other answers are small, and this one moves through a channel.
        batch: Box<Batch>,
        position: CommitPosition,
        took: Duration,
    },
    /// The part comes back to be dropped by the route: freeing its thousands of documents
    /// takes milliseconds that the worker spends writing the part queued behind it.
    Part(Box<Batch>),
    Abandoned,
    Durable,
    /// The job being done holds the checkpoint row now ([`Job::CommitHolding`],
    /// [`Job::CommitAfter`]): not its answer, which comes after.
    HoldingCheckpoint,
}

/// The session's handle on the worker task; dropping it ends the task.
pub struct ApplyWorker {
    jobs: mpsc::Sender<Job>,
    done: mpsc::UnboundedReceiver<Result<Done, ApplyError>>,
    task: tokio::task::JoinHandle<()>,
    in_flight: usize,
}

impl ApplyWorker {
    pub fn spawn(writer: TargetWriter) -> Self {
        let (jobs, job_queue) = mpsc::channel(1);
        let (done_sender, done) = mpsc::unbounded_channel();
        let task = tokio::spawn(work(writer, job_queue, done_sender));
        ApplyWorker {
            jobs,
            done,
            task,
            in_flight: 0,
        }
    }

    /// Jobs sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues a job. A worker that stopped on a failed job fails the send with that failure,
    /// which may not have been read yet: a part queued behind one that lost the connection
    /// must end the session as the lost connection (retried), not as a vanished worker.
    pub async fn send(&mut self, job: Job) -> Result<(), ApplyError> {
        if self.jobs.send(job).await.is_err() {
            return Err(self.failure());
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Why the worker stopped: the failure it answered last, after the answers still unread
    /// (it answers before it stops, so the failure is there once its queue is closed).
    fn failure(&mut self) -> ApplyError {
        while let Ok(answer) = self.done.try_recv() {
            if let Err(error) = answer {
                return error;
            }
        }
        ApplyError::WorkerGone
    }

    /// The answer to the oldest job in flight, or word of its progress
    /// ([`Done::HoldingCheckpoint`]). Cancel-safe: an answer is only taken once.
    pub async fn recv(&mut self) -> Result<Done, ApplyError> {
        let done = self.done.recv().await.ok_or(ApplyError::WorkerGone)?;
        if !matches!(done, Ok(Done::HoldingCheckpoint)) {
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        done
    }

    /// Sends a job and waits for its answer; nothing else may be in flight.
    pub async fn run(&mut self, job: Job) -> Result<Done, ApplyError> {
        debug_assert_eq!(self.in_flight, 0, "run waits for its own answer only");
        self.send(job).await?;
        self.recv().await
    }
}

impl Drop for ApplyWorker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn work(
    mut writer: TargetWriter,
    mut jobs: mpsc::Receiver<Job>,
    done: mpsc::UnboundedSender<Result<Done, ApplyError>>,
) {
    while let Some(job) = jobs.recv().await {
        let result = match job {
            Job::Commit(batch) => {
                let started = Instant::now();
                writer.apply(&batch).await.map(|position| Done::Committed {
                    batch: Box::new(batch),
                    position,
                    took: started.elapsed(),
                })
            }
            Job::CommitHolding(batch) => {
                let started = Instant::now();
                let holding = writer.begin_holding_checkpoint().await.map(|()| {
                    // The route reads it before the answer: both go through this channel.
                    let _ = done.send(Ok(Done::HoldingCheckpoint));
                });
                match holding {
                    Ok(()) => writer.apply(&batch).await.map(|position| Done::Committed {
                        batch: Box::new(batch),
                        position,
                        took: started.elapsed(),
                    }),
                    Err(error) => Err(error),
                }
            }
            Job::CommitAfter(batch, after) => {
                let started = Instant::now();
                let (held, mut holding) = oneshot::channel();
                let result = {
                    let apply = writer.apply_after(&batch, after, held);
                    tokio::pin!(apply);
                    let mut heard = false;
                    loop {
                        tokio::select! {
                            result = &mut apply => break result,
                            holds = &mut holding, if !heard => {
                                heard = true;
                                if holds.is_ok() {
                                    let _ = done.send(Ok(Done::HoldingCheckpoint));
                                }
                            }
                        }
                    }
                };
                result.map(|position| Done::Committed {
                    batch: Box::new(batch),
                    position,
                    took: started.elapsed(),
                })
            }
            Job::Part(batch) => writer
                .apply_part(&batch)
                .await
                .map(|()| Done::Part(Box::new(batch))),
            Job::Abandon => writer.abandon().await.map(|()| Done::Abandoned),
            Job::MakeDurable(idle) => writer.make_durable(idle).await.map(|()| Done::Durable),
            Job::SyncWal => writer.sync_wal().await.map(|()| Done::Durable),
        };
        let failed = result.is_err();
        if done.send(result).is_err() || failed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker whose task is already gone, having answered `answers` (the last one its
    /// failure, as `work` leaves them).
    fn stopped_worker(answers: Vec<Result<Done, ApplyError>>) -> ApplyWorker {
        let (jobs, job_queue) = mpsc::channel(1);
        drop(job_queue);
        let (done_sender, done) = mpsc::unbounded_channel();
        let in_flight = answers.len();
        for answer in answers {
            done_sender.send(answer).unwrap();
        }
        let task = tokio::spawn(async {});
        ApplyWorker {
            jobs,
            done,
            task,
            in_flight,
        }
    }

    #[tokio::test]
    async fn a_job_sent_after_a_failure_fails_with_that_failure() {
        // A part queued behind one that failed (the connection lost): the error that stopped
        // the worker is what the caller must see, so that a transient failure is retried
        // rather than reported as a bug.
        let mut worker = stopped_worker(vec![
            Ok(Done::Durable),
            Err(ApplyError::Stalled {
                timeout: Duration::from_secs(1),
            }),
        ]);
        let error = worker.send(Job::Abandon).await.unwrap_err();
        assert!(matches!(error, ApplyError::Stalled { .. }), "got {error:?}");
        assert!(error.is_transient());
    }

    #[tokio::test]
    async fn a_worker_gone_without_a_failure_is_a_bug() {
        let mut worker = stopped_worker(Vec::new());
        let error = worker.send(Job::Abandon).await.unwrap_err();
        assert!(matches!(error, ApplyError::WorkerGone), "got {error:?}");
    }
}
