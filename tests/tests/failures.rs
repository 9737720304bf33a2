//! Failure edges (deadlocks between nested Updates, their retry) on both
//! stores.

mod mem {
    chatstate_tests::failure_suite!(chatstate_tests::MemBackend);
}

mod pg {
    chatstate_tests::failure_suite!(chatstate_tests::PgBackend);
}
