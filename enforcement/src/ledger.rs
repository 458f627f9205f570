//! What each live allocation of this process was charged, so that its free gives back exactly
//! that, to the device it came from.
//!
//! Virtual-memory-management (VMM) allocations live longer than their handle: `cuMemRelease`
//! on a handle that is still mapped frees nothing until the last `cuMemUnmap`, and
//! `cuMemRetainAllocationHandle` hands out one more reference that needs its own release. So a
//! `Physical` entry counts its references (the handle, each mapping, each retain) and its
//! charge is given back when the last one goes, as the driver frees the memory.

use std::collections::{BTreeMap, HashMap};
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

#[derive(Debug, Clone, Copy)]
struct Entry {
    charge: Charge,
    /// Live references: 1 for the allocation itself, plus (VMM) one per mapping and retain.
    refs: u32,
}

#[derive(Default)]
struct Entries {
    by_key: HashMap<(Kind, u64), Entry>,
    /// VMM mappings: start address -> (size, handle), for the handles we charged.
    mappings: BTreeMap<u64, (u64, u64)>,
}

#[derive(Default)]
pub struct Ledger {
    entries: Mutex<Entries>,
}

impl Ledger {
    /// Records a new allocation (one reference); returns a stale entry under the same key.
    pub fn insert(&self, kind: Kind, key: u64, charge: Charge) -> Option<Charge> {
        self.lock()
            .by_key
            .insert((kind, key), Entry { charge, refs: 1 })
            .map(|e| e.charge)
    }

    /// Drops one reference; returns the charge when it was the last one.
    pub fn remove(&self, kind: Kind, key: u64) -> Option<Charge> {
        let mut entries = self.lock();
        let entry = entries.by_key.get_mut(&(kind, key))?;
        entry.refs = entry.refs.saturating_sub(1);
        if entry.refs > 0 {
            return None;
        }
        entries.by_key.remove(&(kind, key)).map(|e| e.charge)
    }

    /// Puts back a reference `remove` took, when the driver refused the free: the entry again
    /// if it was the last one, otherwise one more reference.
    pub fn restore(&self, kind: Kind, key: u64, last: Option<Charge>) {
        let mut entries = self.lock();
        match last {
            Some(charge) => {
                entries
                    .by_key
                    .insert((kind, key), Entry { charge, refs: 1 });
            }
            None => {
                if let Some(e) = entries.by_key.get_mut(&(kind, key)) {
                    e.refs = e.refs.saturating_add(1);
                }
            }
        }
    }

    /// One more reference to a charged VMM handle (`cuMemRetainAllocationHandle`); false when
    /// the handle is not ours (imported from another process, or never charged).
    pub fn retain(&self, key: u64) -> bool {
        match self.lock().by_key.get_mut(&(Kind::Physical, key)) {
            Some(e) => {
                e.refs = e.refs.saturating_add(1);
                true
            }
            None => false,
        }
    }

    /// `handle` mapped at `[start, start + size)`: the mapping holds a reference.
    pub fn map(&self, start: u64, size: u64, handle: u64) {
        let mut entries = self.lock();
        if let Some(e) = entries.by_key.get_mut(&(Kind::Physical, handle)) {
            e.refs = e.refs.saturating_add(1);
            entries.mappings.insert(start, (size, handle));
        }
    }

    /// Takes out the mappings that start in `[start, start + size)` (`cuMemUnmap` unmaps whole
    /// mappings), before the driver is asked; `unmapped` or `remap` finishes the job.
    pub fn take_mappings(&self, start: u64, size: u64) -> Vec<(u64, u64, u64)> {
        let mut entries = self.lock();
        let end = start.saturating_add(size.max(1));
        let starts: Vec<u64> = entries
            .mappings
            .range(start..end)
            .map(|(s, _)| *s)
            .collect();
        starts
            .into_iter()
            .filter_map(|s| {
                entries
                    .mappings
                    .remove(&s)
                    .map(|(size, handle)| (s, size, handle))
            })
            .collect()
    }

    /// The driver unmapped `taken`: their references go; returns the charges of the handles
    /// whose last reference that was.
    pub fn unmapped(&self, taken: &[(u64, u64, u64)]) -> Vec<Charge> {
        taken
            .iter()
            .filter_map(|&(_, _, handle)| self.remove(Kind::Physical, handle))
            .collect()
    }

    /// The driver refused the unmap: the mappings stand.
    pub fn remap(&self, taken: Vec<(u64, u64, u64)>) {
        let mut entries = self.lock();
        for (start, size, handle) in taken {
            entries.mappings.insert(start, (size, handle));
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().by_key.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // A panic cannot happen while the map is held, but never let poison stop a free.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Charge = Charge {
        device: 0,
        bytes: 1,
    };
    const B: Charge = Charge {
        device: 1,
        bytes: 2,
    };

    #[test]
    fn kinds_do_not_collide() {
        let ledger = Ledger::default();
        assert_eq!(ledger.insert(Kind::Pointer, 7, A), None);
        assert_eq!(ledger.insert(Kind::Physical, 7, B), None);
        assert_eq!(ledger.len(), 2);
        assert_eq!(ledger.remove(Kind::Pointer, 7), Some(A));
        assert_eq!(ledger.remove(Kind::Pointer, 7), None);
        assert_eq!(ledger.remove(Kind::Physical, 7), Some(B));
    }

    #[test]
    fn a_vmm_handle_is_refunded_when_its_last_reference_goes() {
        let ledger = Ledger::default();
        ledger.insert(Kind::Physical, 9, B);
        ledger.map(0x1000, 0x2000, 9);
        ledger.map(0x3000, 0x1000, 9);
        assert!(ledger.retain(9));
        assert!(!ledger.retain(10), "not ours");
        // Released while mapped twice and retained once: nothing is freed yet.
        assert_eq!(ledger.remove(Kind::Physical, 9), None);
        let taken = ledger.take_mappings(0x1000, 0x3000);
        assert_eq!(taken.len(), 2, "one unmap may cover several mappings");
        assert!(
            ledger.unmapped(&taken).is_empty(),
            "the retain still holds it"
        );
        assert_eq!(ledger.remove(Kind::Physical, 9), Some(B));
        assert_eq!(ledger.len(), 0);
    }

    #[test]
    fn a_refused_unmap_or_free_changes_nothing() {
        let ledger = Ledger::default();
        ledger.insert(Kind::Physical, 9, B);
        ledger.map(0x1000, 0x1000, 9);
        let taken = ledger.take_mappings(0x1000, 0x1000);
        ledger.remap(taken);
        let last = ledger.remove(Kind::Physical, 9);
        assert_eq!(last, None, "still mapped");
        ledger.restore(Kind::Physical, 9, last);
        assert_eq!(ledger.remove(Kind::Physical, 9), None);
        let taken = ledger.take_mappings(0x1000, 1);
        assert_eq!(ledger.unmapped(&taken), vec![B]);
        // A mapping of a handle we never charged is not recorded.
        ledger.map(0x5000, 0x1000, 77);
        assert!(ledger.take_mappings(0, u64::MAX).is_empty());
    }
}
