//! A running batch seen from outside: its figures on a Prometheus endpoint. (Its traces are recorded
//! by the scheduler, [`crate::scheduler::trace`], and exported by the Python layer.)

pub mod prometheus;
