//! The input-boundary tests on the in-memory store.

chatstate_tests::boundary_suite!(chatstate_tests::MemBackend);
