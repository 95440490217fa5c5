//! Where a fleet sends each prefix group: groups placed on endpoints by KV capacity with
//! bounded-load consistent hashing (Mirrokni, Thorup and Zadimoghaddam, 2018), so the same group
//! lands on the same endpoint run after run and no endpoint holds much more than its share of the
//! prefixes; a group's overflow goes to one second endpoint only when its own endpoint's queue passes
//! a bound (the group moves to one place rather than scattering over all of them); the groups of an
//! endpoint that dies are placed again, and an endpoint that returns takes groups back from the
//! most loaded. An agent's later turns go where its earlier turns went: its history is cached there.
//!
//! Plain data, no I/O and no clock: the fleet passes each decision the endpoints' state.

use std::collections::HashMap;

/// Load above the mean (as a factor) that a placement may put on one endpoint: the `c` of
/// bounded-load consistent hashing.
const BALANCE: f64 = 1.25;

/// Points of each endpoint on the hash ring: enough that ring arcs even out for a few endpoints.
const POINTS_PER_ENDPOINT: u64 = 64;

/// Groups and conversations remembered; beyond this the older placements are forgotten (a group
/// that comes back is placed afresh, a conversation goes by its group).
const MAX_REMEMBERED: usize = 100_000;

/// What the fleet knows of one endpoint when it routes a call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EndpointView {
    /// Live (passed its last health check or call).
    pub up: bool,
    /// May take this call (serves the model, not already tried by it).
    pub eligible: bool,
    pub outstanding: usize,
    /// Its adaptive concurrency limit.
    pub limit: usize,
    /// KV capacity in tokens (from its `/metrics`; any equal value where unknown).
    pub kv_tokens: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Home {
    endpoint: usize,
    spill: Option<usize>,
    tokens: usize,
}

/// The prefix groups placed on a fleet's endpoints.
#[derive(Debug)]
pub struct Placement {
    homes: HashMap<u64, Home>,
    conversations: HashMap<u64, usize>,
    /// Per endpoint: tokens of the prefixes placed there, groups placed there.
    held: Vec<(usize, usize)>,
    /// The endpoints' liveness as last seen, to notice deaths and returns.
    seen_up: Vec<bool>,
    ring: Vec<(u64, usize)>,
    /// Calls an endpoint may have outstanding beyond the least loaded before a group spills.
    slack: usize,
    spills: Vec<u64>,
    moves: u64,
}

/// Per-endpoint figures of the placement, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacementStats {
    pub groups: usize,
    pub prefix_tokens: usize,
    /// Calls sent to this endpoint as a group's second endpoint.
    pub spilled_in: u64,
}

impl Placement {
    pub fn new(endpoints: usize, slack: usize) -> Self {
        let mut ring: Vec<(u64, usize)> = (0..endpoints)
            .flat_map(|e| (0..POINTS_PER_ENDPOINT).map(move |p| (mix((e as u64) << 32 | p), e)))
            .collect();
        ring.sort_unstable();
        Self {
            homes: HashMap::new(),
            conversations: HashMap::new(),
            held: vec![(0, 0); endpoints],
            seen_up: vec![true; endpoints],
            ring,
            slack,
            spills: vec![0; endpoints],
            moves: 0,
        }
    }

    /// The endpoint for a call of prefix group `group` (its key and prefix tokens; `None`: nothing
    /// shared) in conversation `conversation` (set on an agent's later turns), or `None` when no
    /// endpoint is eligible.
    pub fn route(
        &mut self,
        group: Option<(u64, usize)>,
        conversation: Option<(u64, bool)>,
        endpoints: &[EndpointView],
    ) -> Option<usize> {
        self.notice_liveness(endpoints);
        let eligible = |i: usize| endpoints.get(i).is_some_and(|e| e.up && e.eligible);
        let least = (0..endpoints.len()).filter(|&i| eligible(i)).min_by(|&a, &b| {
            let load =
                |i: usize| endpoints.get(i).map_or(f64::INFINITY, |e| e.outstanding as f64 / e.limit.max(1) as f64);
            load(a).total_cmp(&load(b))
        })?;
        let bound = endpoints.get(least).map_or(0, |e| e.outstanding).saturating_add(self.slack);
        let overloaded = |i: usize| endpoints.get(i).is_none_or(|e| e.outstanding >= e.limit || e.outstanding > bound);
        let chosen = 'chosen: {
            // An agent's later turn: where its history is.
            if let Some((id, true)) = conversation {
                if let Some(&e) = self.conversations.get(&id) {
                    if eligible(e) && !overloaded(e) {
                        break 'chosen e;
                    }
                }
            }
            let Some((key, tokens)) = group else { break 'chosen least };
            let home = match self.homes.get(&key) {
                Some(h) if endpoints.get(h.endpoint).is_some_and(|e| e.up) => *h,
                _ => {
                    let Some(endpoint) = self.place(key, tokens, endpoints, None) else { break 'chosen least };
                    self.set_home(key, Home { endpoint, spill: None, tokens });
                    Home { endpoint, spill: None, tokens }
                }
            };
            if eligible(home.endpoint) && !overloaded(home.endpoint) {
                break 'chosen home.endpoint;
            }
            // Past the bound: the group's overflow goes to one second endpoint, the same one each
            // time while it has room, so the prefix is computed in two places, not in all.
            let spill = match home.spill {
                Some(s) if eligible(s) && !overloaded(s) => s,
                _ => {
                    let s = least;
                    if let Some(h) = self.homes.get_mut(&key) {
                        h.spill = (s != h.endpoint).then_some(s);
                    }
                    s
                }
            };
            if let Some(n) = self.spills.get_mut(spill) {
                *n += 1;
            }
            spill
        };
        if let Some((id, _)) = conversation {
            if self.conversations.len() >= MAX_REMEMBERED {
                self.conversations.clear();
            }
            self.conversations.insert(id, chosen);
        }
        Some(chosen)
    }

    pub fn stats(&self) -> Vec<PlacementStats> {
        self.held
            .iter()
            .zip(&self.spills)
            .map(|(&(tokens, groups), &spilled_in)| PlacementStats { groups, prefix_tokens: tokens, spilled_in })
            .collect()
    }

    /// Groups moved from one endpoint to another (death, return).
    pub fn moves(&self) -> u64 {
        self.moves
    }

    /// The endpoint a group is placed on.
    pub fn home_of(&self, key: u64) -> Option<usize> {
        self.homes.get(&key).map(|h| h.endpoint)
    }

    /// Bounded-load consistent hashing: from the group's point on the ring, the first live endpoint
    /// whose KV share after taking the group stays within `BALANCE` x the mean; failing that, the one
    /// least full.
    fn place(&self, key: u64, tokens: usize, endpoints: &[EndpointView], not: Option<usize>) -> Option<usize> {
        let live = |i: usize| not != Some(i) && endpoints.get(i).is_some_and(|e| e.up);
        let capacity = |i: usize| endpoints.get(i).map_or(1, |e| e.kv_tokens.max(1)) as f64;
        let held = |i: usize| self.held.get(i).map_or(0, |h| h.0) as f64;
        let live_total: f64 = (0..endpoints.len()).filter(|&i| live(i)).map(capacity).sum();
        if live_total <= 0.0 {
            return None;
        }
        let held_total: f64 = (0..endpoints.len()).filter(|&i| live(i)).map(held).sum();
        let mean_share = (held_total + tokens as f64) / live_total;
        let start = self.ring.partition_point(|&(point, _)| point < mix(key));
        let walk = self.ring.iter().cycle().skip(start).take(self.ring.len());
        for &(_, e) in walk {
            if !live(e) {
                continue;
            }
            let share = (held(e) + tokens as f64) / capacity(e);
            // A group larger than the bound still goes to an empty endpoint.
            if share <= BALANCE * mean_share || held(e) == 0.0 {
                return Some(e);
            }
        }
        (0..endpoints.len()).filter(|&i| live(i)).min_by(|&a, &b| {
            ((held(a) + tokens as f64) / capacity(a)).total_cmp(&((held(b) + tokens as f64) / capacity(b)))
        })
    }

    fn set_home(&mut self, key: u64, home: Home) {
        if self.homes.len() >= MAX_REMEMBERED && !self.homes.contains_key(&key) {
            self.homes.clear();
            self.held.iter_mut().for_each(|h| *h = (0, 0));
        }
        if let Some(old) = self.homes.insert(key, home) {
            if let Some(h) = self.held.get_mut(old.endpoint) {
                *h = (h.0.saturating_sub(old.tokens), h.1.saturating_sub(1));
            }
        }
        if let Some(h) = self.held.get_mut(home.endpoint) {
            *h = (h.0 + home.tokens, h.1 + 1);
        }
    }

    /// Re-places the groups of an endpoint that went down, and moves groups to one that came back
    /// until it holds about its share.
    fn notice_liveness(&mut self, endpoints: &[EndpointView]) {
        for i in 0..self.seen_up.len().min(endpoints.len()) {
            let up = endpoints.get(i).is_some_and(|e| e.up);
            if self.seen_up.get(i) == Some(&up) {
                continue;
            }
            if let Some(seen) = self.seen_up.get_mut(i) {
                *seen = up;
            }
            if up {
                self.rebalance_onto(i, endpoints);
            } else {
                self.evacuate(i, endpoints);
            }
        }
    }

    fn evacuate(&mut self, dead: usize, endpoints: &[EndpointView]) {
        let mut moving: Vec<(u64, usize)> =
            self.homes.iter().filter(|(_, h)| h.endpoint == dead).map(|(&k, h)| (k, h.tokens)).collect();
        // Largest first: bin packing's first-fit-decreasing order.
        moving.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        for (key, tokens) in moving {
            if let Some(endpoint) = self.place(key, tokens, endpoints, Some(dead)) {
                self.set_home(key, Home { endpoint, spill: None, tokens });
                self.moves += 1;
            }
        }
        for home in self.homes.values_mut() {
            if home.spill == Some(dead) {
                home.spill = None;
            }
        }
    }

    fn rebalance_onto(&mut self, back: usize, endpoints: &[EndpointView]) {
        let capacity = |i: usize| endpoints.get(i).map_or(1, |e| e.kv_tokens.max(1)) as f64;
        loop {
            let share = |i: usize| self.held.get(i).map_or(0, |h| h.0) as f64 / capacity(i);
            let Some(fullest) = (0..endpoints.len())
                .filter(|&i| i != back && endpoints.get(i).is_some_and(|e| e.up))
                .max_by(|&a, &b| share(a).total_cmp(&share(b)))
            else {
                return;
            };
            // The largest group of the fullest endpoint whose move narrows the gap.
            let gap = share(fullest) - share(back);
            let candidate = self
                .homes
                .iter()
                .filter(|(_, h)| h.endpoint == fullest)
                .filter(|(_, h)| {
                    // After the move the gap is `gap - shift`: narrower only if `shift < 2 gap`.
                    let t = h.tokens as f64;
                    t / capacity(back) + t / capacity(fullest) < 2.0 * gap
                })
                .max_by_key(|(&k, h)| (h.tokens, k))
                .map(|(&k, h)| (k, h.tokens));
            let Some((key, tokens)) = candidate else { return };
            self.set_home(key, Home { endpoint: back, spill: None, tokens });
            self.moves += 1;
        }
    }
}

/// The `SplitMix64` finaliser: spreads keys and ring points evenly.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::arithmetic_side_effects)]
    use super::*;

    fn views(n: usize) -> Vec<EndpointView> {
        vec![EndpointView { up: true, eligible: true, outstanding: 0, limit: 1024, kv_tokens: 100_000 }; n]
    }

    #[test]
    fn groups_spread_by_kv_share_and_stay_put() {
        let mut p = Placement::new(3, 8);
        let e = views(3);
        let homes: Vec<usize> = (0..6u64).map(|k| p.route(Some((k, 20_000)), None, &e).unwrap()).collect();
        let mut per = [0; 3];
        for &h in &homes {
            per[h] += 1;
        }
        assert_eq!(per, [2, 2, 2], "six equal groups on three equal endpoints: {homes:?}");
        for (k, &h) in homes.iter().enumerate() {
            assert_eq!(p.route(Some((k as u64, 20_000)), None, &e), Some(h), "a group stays where it is");
        }
        let stats = p.stats();
        assert!(stats.iter().all(|s| s.groups == 2 && s.prefix_tokens == 40_000));
    }

    #[test]
    fn a_busy_group_spills_to_one_second_endpoint_not_all() {
        let mut p = Placement::new(4, 8);
        let mut e = views(4);
        let home = p.route(Some((7, 20_000)), None, &e).unwrap();
        e[home].outstanding = 40;
        let spills: Vec<usize> = (0..20)
            .map(|_| {
                let s = p.route(Some((7, 20_000)), None, &e).unwrap();
                e[s].outstanding += 1;
                s
            })
            .collect();
        assert!(spills.iter().all(|&s| s != home));
        // The first second endpoint takes the overflow until it is itself `slack` past the others.
        assert!(spills[..9].iter().all(|&s| s == spills[0]), "one second endpoint while it has room: {spills:?}");
        e[home].outstanding = 0;
        assert_eq!(p.route(Some((7, 20_000)), None, &e), Some(home), "back home once its queue drains");
    }

    #[test]
    fn a_dead_endpoints_groups_move_and_some_come_back_when_it_returns() {
        let mut p = Placement::new(3, 8);
        let mut e = views(3);
        for k in 0..6u64 {
            p.route(Some((k, 20_000)), None, &e);
        }
        let on_dead: Vec<u64> = (0..6u64).filter(|&k| p.home_of(k) == Some(1)).collect();
        assert!(!on_dead.is_empty());
        e[1].up = false;
        for k in 0..6u64 {
            let to = p.route(Some((k, 20_000)), None, &e).unwrap();
            assert_ne!(to, 1);
            assert_eq!(p.home_of(k), Some(to), "the group moved, not just this call");
        }
        assert_eq!(p.stats()[1].groups, 0);
        assert_eq!(p.moves(), on_dead.len() as u64);
        e[1].up = true;
        p.route(None, None, &e);
        assert_eq!(p.stats().iter().map(|s| s.groups).collect::<Vec<_>>(), vec![2, 2, 2], "rebalanced on return");
    }

    #[test]
    fn an_agents_later_turns_follow_its_history() {
        let mut p = Placement::new(3, 8);
        let mut e = views(3);
        // The shared group's home is busy, so the first turn of agent 42 spills.
        let home = p.route(Some((1, 2_000)), None, &e).unwrap();
        e[home].outstanding = 30;
        let first = p.route(Some((1, 2_000)), Some((42, false)), &e).unwrap();
        assert_ne!(first, home);
        e[home].outstanding = 0;
        // Its next turn goes where its history is, though the group's home has room again.
        assert_eq!(p.route(Some((1, 2_000)), Some((42, true)), &e), Some(first));
    }

    #[test]
    fn nothing_eligible_is_none() {
        let mut p = Placement::new(2, 8);
        let mut e = views(2);
        e[0].eligible = false;
        e[1].up = false;
        assert_eq!(p.route(Some((1, 10)), None, &e), None);
    }
}
