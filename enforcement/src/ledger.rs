//! What each live allocation of this process was charged, so that its free gives back exactly
//! that, to the device it came from.

use std::collections::HashMap;
use std::sync::Mutex;

/// Allocations of different APIs live in different namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// cuMemAlloc*, cuMemAllocManaged, cuMemAllocAsync: a device pointer.
    Pointer,
    /// cuMemCreate: a generic allocation handle.
    Physical,
    /// cuArrayCreate, cuArray3DCreate: a CUarray.
    Array,
    /// cuMipmappedArrayCreate: a CUmipmappedArray.
    Mipmapped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    pub device: usize,
    pub bytes: u64,
}

#[derive(Default)]
pub struct Ledger {
    entries: Mutex<HashMap<(Kind, u64), Charge>>,
}

impl Ledger {
    pub fn insert(&self, kind: Kind, key: u64, charge: Charge) -> Option<Charge> {
        self.lock().insert((kind, key), charge)
    }

    pub fn remove(&self, kind: Kind, key: u64) -> Option<Charge> {
        self.lock().remove(&(kind, key))
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Kind, u64), Charge>> {
        // A panic cannot happen while the map is held, but never let poison stop a free.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_do_not_collide() {
        let ledger = Ledger::default();
        let a = Charge {
            device: 0,
            bytes: 1,
        };
        let b = Charge {
            device: 1,
            bytes: 2,
        };
        assert_eq!(ledger.insert(Kind::Pointer, 7, a), None);
        assert_eq!(ledger.insert(Kind::Physical, 7, b), None);
        assert_eq!(ledger.len(), 2);
        assert_eq!(ledger.remove(Kind::Pointer, 7), Some(a));
        assert_eq!(ledger.remove(Kind::Pointer, 7), None);
        assert_eq!(ledger.remove(Kind::Physical, 7), Some(b));
    }
}
