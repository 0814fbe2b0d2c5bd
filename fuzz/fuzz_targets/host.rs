//! The in-memory host every fuzz target that judges runs the policy on.

use trunkguard::alert::Alert;
use trunkguard::store::{MemoryStore, Store, StoreError};
use trunkguard::Host;

#[derive(Default)]
pub struct H(pub MemoryStore);

impl Store for H {
    fn get(&mut self, k: &str) -> Result<Option<Vec<u8>>, StoreError> { self.0.get(k) }
    fn set(&mut self, k: &str, v: &[u8]) -> Result<(), StoreError> { self.0.set(k, v) }
    fn delete(&mut self, k: &str) -> Result<(), StoreError> { self.0.delete(k) }
}

impl Host for H {
    fn alert(&mut self, _: &Alert) {}
    fn fill_random(&mut self, b: &mut [u8]) { b.fill(3) }
}
