//! Prints the authorization matrix (`metta_control::authz::TABLE`) as the
//! Markdown table that `docs/ARCHITECTURE.md` shows:
//! `cargo run -p metta-control --example authz_matrix`.

fn main() {
    print!("{}", metta_control::authz::matrix_markdown());
}
