//! `controller simulate`: the allocation engine on a described cluster and workload, without
//! an API server. Admins use it to compare policies before changing them.

pub mod default;
pub mod input;
pub mod report;
pub mod svg;

use crate::engine::{Engine, Mode, Policies, Refusal};
use crate::model::PodView;
use input::{ClaimObject, Workload};
use std::collections::{BTreeSet, HashMap};
use vgpu_driver::ClaimAllocation;

/// Where `-o yaml|json` puts why a claim was refused.
pub const REFUSED_ANNOTATION: &str = "simulate.vgpu.hami.io/refused";

/// What happened to one claim.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Allocated by the simulation.
    Placed(ClaimAllocation),
    /// Already allocated in the input; counted as it is.
    AlreadyAllocated,
    /// Could not be allocated; the reason.
    Refused(String),
    /// Not a claim of a controller-allocated class.
    NotOurs,
}

/// The result of a simulation.
pub struct Simulation {
    pub engine: Engine,
    pub claims: Vec<(ClaimObject, Outcome)>,
    pub ignored: Vec<String>,
}

/// Run the engine over the workload's pending claims in document order, placing like `mode`.
pub fn run(driver: &str, workload: Workload, policies: Policies, mode: Mode) -> Simulation {
    let mut inputs = workload.inputs;
    // Claims already allocated in the input are state, not work.
    inputs.claims = workload
        .claims
        .iter()
        .filter_map(|c| c.view().ok())
        .filter(|c| c.allocation.is_some())
        .collect();
    let mut engine = Engine::new(driver, &inputs, policies).with_mode(mode);
    // The first pod (in document order) that uses each claim, by namespace and claim name:
    // a scan of every pod per claim is quadratic at cluster scale.
    let mut pod_of: HashMap<(&str, &str), &PodView> = HashMap::new();
    for pod in &inputs.pods {
        for claim in &pod.claims {
            pod_of
                .entry((pod.namespace.as_str(), claim.as_str()))
                .or_insert(pod);
        }
    }
    let mut claims = Vec::new();
    for object in workload.claims {
        let outcome = match object.view() {
            Err(e) => Outcome::Refused(e.to_string()),
            Ok(view) if view.allocation.is_some() => Outcome::AlreadyAllocated,
            Ok(view) => {
                let pod = pod_of
                    .get(&(view.namespace.as_str(), view.name.as_str()))
                    .copied();
                match engine.allocate(&view, pod, &BTreeSet::new()) {
                    Ok(allocation) => {
                        engine.commit(&allocation);
                        Outcome::Placed(allocation)
                    }
                    Err(Refusal::NotOurs(_)) => Outcome::NotOurs,
                    Err(e) => Outcome::Refused(e.to_string()),
                }
            }
        };
        claims.push((object, outcome));
    }
    Simulation {
        engine,
        claims,
        ignored: workload.ignored,
    }
}

impl Simulation {
    /// The claims with their status.allocation, as the API server would hold them.
    pub fn claim_objects(&self) -> Vec<serde_json::Value> {
        self.claims
            .iter()
            .map(|(object, outcome)| {
                let mut object = object.clone();
                if let Outcome::Refused(reason) = outcome {
                    // The claim has no status field for it: an annotation carries what the
                    // table prints, so a script reading yaml or json sees why too.
                    let key = format!("ResourceClaim {}: ", object.key());
                    object
                        .claim
                        .metadata
                        .annotations
                        .get_or_insert_with(Default::default)
                        .insert(
                            REFUSED_ANNOTATION.to_string(),
                            reason.strip_prefix(&key).unwrap_or(reason).to_string(),
                        );
                }
                if let Outcome::Placed(a) = outcome {
                    let claim = &mut object.claim;
                    claim.status.get_or_insert_with(Default::default).allocation =
                        Some(a.to_result());
                    claim
                        .metadata
                        .finalizers
                        .get_or_insert_with(Vec::new)
                        .push("resource.kubernetes.io/delete-protection".into());
                }
                object.to_wire()
            })
            .collect()
    }
}
