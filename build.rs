// sqlx::migrate! embeds the migrations at compile time; without this, a new
// migration file is not picked up until something else changes (sqlx's
// documented advice).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
