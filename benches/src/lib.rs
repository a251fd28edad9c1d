//! criterion benchmarks live in `benches/`; this library is empty. Run them with
//! `cargo bench -p sheaf-benches`; each reports against a baseline measured in the
//! same run (a plain copy of the same bytes, a direct call).
