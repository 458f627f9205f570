//! The NVLink search behind `topology: Required` (and the first choice of `Preferred`): the
//! first set of `count` candidates, in the caller's preference order, that are pairwise
//! NVLink peers.
//!
//! A greedy walk from each start GPU misses sets on partial meshes: on a DGX-1 cube-mesh it
//! can take a peer of the start that is no peer of the others and never back out. This is an
//! exact branch-and-bound instead: candidates are extended in order, and a branch is cut
//! only when it provably cannot reach `count` (too few common peers left, or fewer colours
//! in a greedy colouring of them than GPUs still needed: a clique needs one colour per
//! member). It therefore finds a set whenever one exists, and the set it finds is the
//! lexicographically first by candidate position, so the GPU policy's order still decides
//! between equally valid sets. The search visits at most the 2^n subsets of the n candidates
//! of one node (n is 8 or 16 on real boards); the bounds keep it far below that in practice.

/// A set of candidate positions as a bit set.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Bits(Vec<u64>);

impl Bits {
    fn empty(n: usize) -> Bits {
        Bits(vec![0; n.div_ceil(64)])
    }

    fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    fn remove(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }

    fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    fn first(&self) -> Option<usize> {
        self.0
            .iter()
            .enumerate()
            .find(|(_, w)| **w != 0)
            .map(|(i, w)| i * 64 + w.trailing_zeros() as usize)
    }

    fn and(&self, other: &Bits) -> Bits {
        Bits(self.0.iter().zip(&other.0).map(|(a, b)| a & b).collect())
    }

    fn and_not(&mut self, other: &Bits) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a &= !b;
        }
    }
}

/// The first `count` positions of `0..n`, in lexicographic order, that are pairwise `linked`
/// (asked both ways: a link one side does not list is not trusted). `None` when no such set
/// exists. `count` 0 or 1 needs no links.
pub fn first_clique(
    n: usize,
    count: usize,
    linked: impl Fn(usize, usize) -> bool,
) -> Option<Vec<usize>> {
    if count > n {
        return None;
    }
    // Only the positions after a member are ever added to it, which keeps the order.
    let mut later = vec![Bits::empty(n); n];
    let mut peers = vec![Bits::empty(n); n];
    for a in 0..n {
        for b in 0..n {
            if a != b && linked(a, b) && linked(b, a) {
                peers[a].insert(b);
                if b > a {
                    later[a].insert(b);
                }
            }
        }
    }
    let mut all = Bits::empty(n);
    for i in 0..n {
        all.insert(i);
    }
    let mut chosen = Vec::with_capacity(count);
    extend(&later, &peers, all, count, &mut chosen).then_some(chosen)
}

/// Extend `chosen` to `count` members from `open` (the positions linked to every member and
/// after the last one).
fn extend(
    later: &[Bits],
    peers: &[Bits],
    mut open: Bits,
    count: usize,
    chosen: &mut Vec<usize>,
) -> bool {
    let need = count - chosen.len();
    if need == 0 {
        return true;
    }
    if open.len() < need || (need > 1 && colours(peers, &open) < need) {
        return false;
    }
    while let Some(v) = open.first() {
        open.remove(v);
        chosen.push(v);
        if extend(later, peers, open.and(&later[v]), count, chosen) {
            return true;
        }
        chosen.pop();
        if open.len() < need {
            break;
        }
    }
    false
}

/// The number of colours a greedy colouring of `set` uses: no clique inside `set` is larger,
/// as its members need pairwise different colours.
fn colours(peers: &[Bits], set: &Bits) -> usize {
    let mut uncoloured = set.clone();
    let mut colours = 0;
    while !uncoloured.is_empty() {
        colours += 1;
        // One colour class: an independent set taken greedily.
        let mut free = uncoloured.clone();
        while let Some(v) = free.first() {
            free.remove(v);
            uncoloured.remove(v);
            free.and_not(&peers[v]);
        }
    }
    colours
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DGX-1 hybrid cube-mesh: two fully linked quads, GPU i linked to i + 4.
    fn cube_mesh(a: usize, b: usize) -> bool {
        a != b && (a / 4 == b / 4 || a % 4 == b % 4)
    }

    #[test]
    fn backs_out_of_a_start_that_leads_nowhere() {
        // In this order a greedy walk from 0 takes 4, then finds no third GPU linked to both.
        let order = [0, 4, 1, 2, 3];
        let got = first_clique(order.len(), 4, |a, b| cube_mesh(order[a], order[b]));
        let gpus: Vec<usize> = got.unwrap().into_iter().map(|i| order[i]).collect();
        assert_eq!(gpus, [0, 1, 2, 3]);
    }

    #[test]
    fn a_cube_mesh_has_no_three_across_the_quads() {
        let order = [0, 4, 5, 1];
        assert_eq!(
            first_clique(order.len(), 3, |a, b| cube_mesh(order[a], order[b])),
            None
        );
        // Pairs there are: the first in candidate order is GPUs 0 and 4.
        assert_eq!(
            first_clique(order.len(), 2, |a, b| cube_mesh(order[a], order[b])),
            Some(vec![0, 1])
        );
    }

    #[test]
    fn a_link_listed_one_way_is_not_a_link() {
        assert_eq!(first_clique(2, 2, |a, b| a == 0 && b == 1), None);
        assert_eq!(first_clique(2, 2, |a, b| a != b), Some(vec![0, 1]));
    }

    #[test]
    fn small_counts_need_no_links() {
        assert_eq!(first_clique(3, 1, |_, _| false), Some(vec![0]));
        assert_eq!(first_clique(3, 0, |_, _| false), Some(vec![]));
        assert_eq!(first_clique(0, 1, |_, _| true), None);
        assert_eq!(first_clique(2, 3, |_, _| true), None);
    }

    #[test]
    fn sets_wider_than_one_word() {
        // 70 positions, only the last 5 pairwise linked.
        let got = first_clique(70, 5, |a, b| a != b && a >= 65 && b >= 65);
        assert_eq!(got, Some(vec![65, 66, 67, 68, 69]));
    }
}
