//! Build-time facts: recompile when migrations change (they are embedded), and bake in the
//! git revision when the build provides one.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-env-changed=SPECTRAL_GIT_SHA");
}
