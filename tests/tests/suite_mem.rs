//! The generic store suite on the in-memory store.

chatstate_tests::store_suite!(chatstate_tests::MemBackend);
