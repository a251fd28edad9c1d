//! Builds the example C transport (`c-transport/unix_transport.c`, against
//! `include/sheaf_transport.h`) into a shared library with the `cc` crate; the
//! end-to-end tests find it at `SHEAF_C_TRANSPORT`.

use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("c-transport");
    std::fs::create_dir_all(&out).expect("OUT_DIR is writable");
    let mut build = cc::Build::new();
    build
        .file("c-transport/unix_transport.c")
        .include("../include")
        .pic(true)
        .flag("-pthread")
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true);
    let objects = build.compile_intermediates();
    let library = out.join("libsheaf_unix_c.so");
    let status = build
        .get_compiler()
        .to_command()
        .arg("-shared")
        .arg("-o")
        .arg(&library)
        .args(&objects)
        .arg("-lpthread")
        .status()
        .expect("the C compiler runs");
    assert!(status.success(), "linking {} failed: {status}", library.display());
    println!("cargo:rustc-env=SHEAF_C_TRANSPORT={}", library.display());
    println!("cargo:rerun-if-changed=c-transport/unix_transport.c");
    println!("cargo:rerun-if-changed=../include/sheaf_transport.h");
}
