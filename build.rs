// include_dir! does not notice new template files by itself: rebuild when anything under
// templates/ (or examples/, read by the tests) changes.
fn main() {
    println!("cargo:rerun-if-changed=templates");
    println!("cargo:rerun-if-changed=examples");
}
