//! The generic store suite on PostgreSQL (a throwaway cluster, one database
//! per test).

chatstate_tests::store_suite!(chatstate_tests::PgBackend);
