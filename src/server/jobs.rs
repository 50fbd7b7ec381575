//! The job queue: model work (learning, generating images and videos, training 3D heads) runs one job at a time on the worker thread
//! ([`crate::server::work`]); the others wait in order. Every change (a job queued, a step done, a
//! job ended, the records changed) bumps a version that the event stream
//! (`GET /api/events`) watches, and the stream sends the whole [`Board`] then: a page opened or
//! reloaded at any time shows the running job as it is.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use serde::Serialize;

use crate::server::store::now;

/// Finished jobs kept in the list (the oldest are forgotten; their outputs stay in the store).
const FINISHED_KEPT: usize = 50;

/// What a job does, as requested (checked before it is queued).
#[derive(Debug, Clone)]
pub enum Work {
    Learn(crate::server::work::LearnJob),
    Generate(crate::server::work::GenerateJob),
    Video(crate::server::work::VideoJob),
    ThreeD(crate::server::work::Text3dJob),
}

impl Work {
    fn kind(&self) -> &'static str {
        match self {
            Work::Learn(_) => "learn",
            Work::Generate(_) => "generate",
            Work::Video(_) => "video",
            Work::ThreeD(_) => "3d",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_finished(self) -> bool {
        matches!(self, JobState::Done | JobState::Failed | JobState::Cancelled)
    }
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub id: String,
    /// `learn`, `generate` (images), `video` or `3d`.
    pub kind: &'static str,
    /// What it makes, in words ("learn Anna, 450 steps").
    pub title: String,
    pub state: JobState,
    pub created: u64,
    /// What it does now ("loading the models", "learning", "image 2 of 4").
    pub phase: String,
    /// Steps done and to do in all (learning steps, denoising steps of all images or of the
    /// video, 3D iterations, then the turntable's views).
    pub step: usize,
    pub total: usize,
    /// Seconds left, from the pace of the steps so far.
    pub eta_seconds: Option<f64>,
    /// The loss of every learning step so far.
    pub losses: Vec<f64>,
    /// Preview images made while learning or training a 3D head (ids under `/api/previews/`).
    pub previews: Vec<String>,
    /// The identity learned (a learn job) or the gallery items made (the others), as they come.
    pub identity: Option<String>,
    pub images: Vec<String>,
    /// What the job warns about (the job goes on).
    pub warnings: Vec<String>,
    /// Why it failed, in one line.
    pub error: Option<String>,
}

struct Job {
    view: JobView,
    work: Option<Work>,
    stop: Arc<AtomicBool>,
    /// When the current run of steps began, and the step it began at (for the ETA).
    pace_from: Option<(Instant, usize)>,
}

/// Everything the event stream sends: the jobs, newest first, and the records' version (the page
/// reloads its lists when it changes).
#[derive(Debug, Clone, Serialize)]
pub struct Board {
    pub jobs: Vec<JobView>,
    pub records_version: u64,
}

struct Inner {
    jobs: Vec<Job>,
    queue: VecDeque<String>,
    records_version: u64,
}

/// The queue and the state of every job; shared by the handlers and the worker.
pub struct Jobs {
    inner: Mutex<Inner>,
    work_ready: Condvar,
    version: tokio::sync::watch::Sender<u64>,
}

impl Jobs {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner { jobs: Vec::new(), queue: VecDeque::new(), records_version: 0 }),
            work_ready: Condvar::new(),
            version: tokio::sync::watch::channel(0).0,
        })
    }

    /// A receiver that wakes on every change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn changed(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while the lock was held leaves consistent data here (every update is one
        // assignment), so a poisoned lock is used as it is.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `work` (titled `title`); returns its view.
    pub fn submit(&self, work: Work, title: String) -> JobView {
        let id = crate::server::store::new_id();
        let view = JobView {
            id: id.clone(),
            kind: work.kind(),
            title,
            state: JobState::Queued,
            created: now(),
            phase: "waiting for the jobs before it".into(),
            step: 0,
            total: 0,
            eta_seconds: None,
            losses: Vec::new(),
            previews: Vec::new(),
            identity: None,
            images: Vec::new(),
            warnings: Vec::new(),
            error: None,
        };
        let mut inner = self.lock();
        inner.jobs.insert(0, Job { view: view.clone(), work: Some(work), stop: Arc::default(), pace_from: None });
        inner.queue.push_back(id);
        drop(inner);
        self.work_ready.notify_one();
        self.changed();
        view
    }

    pub fn board(&self) -> Board {
        let inner = self.lock();
        Board { jobs: inner.jobs.iter().map(|j| j.view.clone()).collect(), records_version: inner.records_version }
    }

    pub fn get(&self, id: &str) -> Option<JobView> {
        self.lock().jobs.iter().find(|j| j.view.id == id).map(|j| j.view.clone())
    }

    /// Cancels a job: a queued one at once, a running one at its next step. `None` if there is
    /// no such job; the job's view otherwise (a finished job is left as it is).
    pub fn cancel(&self, id: &str) -> Option<JobView> {
        let mut inner = self.lock();
        let job = inner.jobs.iter_mut().find(|j| j.view.id == id)?;
        match job.view.state {
            JobState::Queued => {
                job.view.state = JobState::Cancelled;
                job.view.phase = "cancelled before it started".into();
                job.work = None;
                inner.queue.retain(|queued| queued != id);
            }
            JobState::Running => {
                job.stop.store(true, Ordering::SeqCst);
                job.view.phase = "cancelling at the next step".into();
            }
            _ => {}
        }
        let view = inner.jobs.iter().find(|j| j.view.id == id).map(|j| j.view.clone());
        drop(inner);
        self.changed();
        view
    }

    /// Stops the running job and empties the queue (the server is stopping).
    pub fn cancel_all(&self) {
        let ids: Vec<String> = self.lock().jobs.iter().map(|j| j.view.id.clone()).collect();
        for id in ids {
            self.cancel(&id);
        }
    }

    /// The records changed (an upload, a deletion, a job's output): the page reloads its lists.
    pub fn records_changed(&self) {
        self.lock().records_version += 1;
        self.changed();
    }

    /// Waits for the next queued job and marks it running: its id, work and stop flag.
    pub fn next(&self) -> (String, Work, Arc<AtomicBool>) {
        let mut inner = self.lock();
        loop {
            while let Some(id) = inner.queue.pop_front() {
                if let Some(job) = inner.jobs.iter_mut().find(|j| j.view.id == id) {
                    if let Some(work) = job.work.take() {
                        job.view.state = JobState::Running;
                        job.view.phase = "starting".into();
                        let stop = job.stop.clone();
                        drop(inner);
                        self.changed();
                        return (id, work, stop);
                    }
                }
            }
            inner = self.work_ready.wait(inner).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Updates the running job `id` through `update`.
    pub fn update(&self, id: &str, update: impl FnOnce(&mut JobView)) {
        let mut inner = self.lock();
        if let Some(job) = inner.jobs.iter_mut().find(|j| j.view.id == id) {
            update(&mut job.view);
        }
        drop(inner);
        self.changed();
    }

    /// Sets a job's phase and its run of steps (`step` of `total`): the ETA is measured from here.
    pub fn phase(&self, id: &str, phase: &str, step: usize, total: usize) {
        let mut inner = self.lock();
        if let Some(job) = inner.jobs.iter_mut().find(|j| j.view.id == id) {
            job.view.phase = phase.to_string();
            job.view.step = step;
            job.view.total = total;
            job.pace_from = Some((Instant::now(), step));
        }
        drop(inner);
        self.changed();
    }

    /// `step` of the job's run of steps is done: the step count and the ETA move.
    pub fn step(&self, id: &str, step: usize) {
        let mut inner = self.lock();
        if let Some(job) = inner.jobs.iter_mut().find(|j| j.view.id == id) {
            job.view.step = step;
            if let Some((since, from)) = job.pace_from {
                let done = step.saturating_sub(from);
                if done > 0 {
                    let per_step = since.elapsed().as_secs_f64() / done as f64;
                    job.view.eta_seconds = Some(per_step * job.view.total.saturating_sub(step) as f64);
                }
            }
        }
        drop(inner);
        self.changed();
    }

    /// Ends the running job `id`: done, cancelled (its stop flag was set) or failed with `error`.
    pub fn finish(&self, id: &str, outcome: std::result::Result<(), String>) {
        let mut inner = self.lock();
        if let Some(job) = inner.jobs.iter_mut().find(|j| j.view.id == id) {
            let cancelled = job.stop.load(Ordering::SeqCst);
            job.view.eta_seconds = None;
            match outcome {
                Ok(()) if cancelled => {
                    job.view.state = JobState::Cancelled;
                    job.view.phase = "cancelled".into();
                }
                Ok(()) => {
                    job.view.state = JobState::Done;
                    job.view.phase = "done".into();
                }
                Err(error) => {
                    job.view.state = JobState::Failed;
                    job.view.phase = "failed".into();
                    job.view.error = Some(error);
                }
            }
        }
        // Forget the oldest finished jobs beyond the limit.
        let mut finished = 0;
        inner.jobs.retain(|job| {
            finished += usize::from(job.view.state.is_finished());
            !job.view.state.is_finished() || finished <= FINISHED_KEPT
        });
        inner.records_version += 1;
        drop(inner);
        self.changed();
    }
}
