//! The input-boundary tests on PostgreSQL (a throwaway cluster, one
//! database per test).

chatstate_tests::boundary_suite!(chatstate_tests::PgBackend);
