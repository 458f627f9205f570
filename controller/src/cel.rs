//! CEL device selectors with Kubernetes DRA semantics: `device.driver`,
//! `device.attributes["<domain>"].<id>`, `device.capacity["<domain>"].<id>` (quantities with
//! `compareTo`, `isGreaterThan`, `isLessThan`, `asInteger`), versions as semver values, and the
//! `quantity()` and `semver()` constructors.

use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;
use cel::extractors::This;
use cel::objects::{Opaque, Value};
use cel::{Context, ExecutionError, Program, ResolveResult};
use std::collections::HashMap;
use std::sync::Arc;
use vgpu_driver::Quantity;
use vgpu_driver::slice::{AttributeValue, PublishedDevice};

/// A Kubernetes quantity inside CEL; equal when numerically equal.
#[derive(Debug, PartialEq, Eq)]
struct CelQuantity(Quantity);

impl Opaque for CelQuantity {
    fn runtime_type_name(&self) -> &str {
        "kubernetes.Quantity"
    }
}

/// A semantic version inside CEL (major, minor, patch, pre-release).
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Semver(u64, u64, u64, String);

impl Opaque for Semver {
    fn runtime_type_name(&self) -> &str {
        "kubernetes.Semver"
    }
}

fn parse_semver(s: &str) -> Option<Semver> {
    let core_end = s.find(['-', '+']).unwrap_or(s.len());
    let pre = s[core_end..]
        .strip_prefix('-')
        .map(|p| p.split('+').next().unwrap_or("").to_string())
        .unwrap_or_default();
    let mut parts = s[..core_end].split('.');
    let mut next = || -> Option<u64> {
        let p = parts.next()?;
        (!p.is_empty()
            && p.bytes().all(|b| b.is_ascii_digit())
            && (p == "0" || !p.starts_with('0')))
        .then(|| p.parse().ok())
        .flatten()
    };
    let v = Semver(next()?, next()?, next()?, pre);
    parts.next().is_none().then_some(v)
}

fn type_error(function: &str, message: &str) -> ExecutionError {
    ExecutionError::function_error(function, message)
}

fn quantity_fn(s: Arc<String>) -> ResolveResult {
    Quantity::parse(&s)
        .map(|q| Value::Opaque(Arc::new(CelQuantity(q))))
        .map_err(|e| type_error("quantity", &e.to_string()))
}

fn semver_fn(s: Arc<String>) -> ResolveResult {
    parse_semver(&s)
        .map(|v| Value::Opaque(Arc::new(v)))
        .ok_or_else(|| type_error("semver", &format!("{s:?} is not a semantic version")))
}

fn is_quantity_fn(s: Arc<String>) -> bool {
    Quantity::parse(&s).is_ok()
}

fn is_semver_fn(s: Arc<String>) -> bool {
    parse_semver(&s).is_some()
}

/// Compare two quantities or two versions.
fn ordering(function: &str, a: &Value, b: &Value) -> Result<std::cmp::Ordering, ExecutionError> {
    if let (Value::Opaque(a), Value::Opaque(b)) = (a, b) {
        if let (Some(a), Some(b)) = (
            a.downcast_ref::<CelQuantity>(),
            b.downcast_ref::<CelQuantity>(),
        ) {
            return Ok(a.0.cmp(&b.0));
        }
        if let (Some(a), Some(b)) = (a.downcast_ref::<Semver>(), b.downcast_ref::<Semver>()) {
            // A pre-release sorts before its release; otherwise numeric order.
            let core = (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2));
            return Ok(core.then_with(|| match (a.3.is_empty(), b.3.is_empty()) {
                (true, true) => std::cmp::Ordering::Equal,
                (true, false) => std::cmp::Ordering::Greater,
                (false, true) => std::cmp::Ordering::Less,
                (false, false) => a.3.cmp(&b.3),
            }));
        }
    }
    Err(type_error(
        function,
        "needs two quantities or two semantic versions",
    ))
}

fn compare_to(This(this): This<Value>, other: Value) -> ResolveResult {
    Ok(Value::Int(ordering("compareTo", &this, &other)? as i64))
}

fn is_greater_than(This(this): This<Value>, other: Value) -> ResolveResult {
    Ok(Value::Bool(
        ordering("isGreaterThan", &this, &other)?.is_gt(),
    ))
}

fn is_less_than(This(this): This<Value>, other: Value) -> ResolveResult {
    Ok(Value::Bool(ordering("isLessThan", &this, &other)?.is_lt()))
}

fn as_integer(This(this): This<Value>) -> ResolveResult {
    match &this {
        Value::Opaque(o) => match o.downcast_ref::<CelQuantity>() {
            Some(q) if q.0.nanos() % 1_000_000_000 == 0 => i64::try_from(q.0.ceil_units())
                .map(Value::Int)
                .map_err(|_| type_error("asInteger", "quantity does not fit an int")),
            Some(_) => Err(type_error("asInteger", "quantity is not an integer")),
            None => Err(type_error("asInteger", "needs a quantity")),
        },
        _ => Err(type_error("asInteger", "needs a quantity")),
    }
}

fn semver_part(function: &str, this: &Value, part: impl Fn(&Semver) -> u64) -> ResolveResult {
    match this {
        Value::Opaque(o) => o
            .downcast_ref::<Semver>()
            .map(|v| Value::Int(part(v) as i64))
            .ok_or_else(|| type_error(function, "needs a semantic version")),
        _ => Err(type_error(function, "needs a semantic version")),
    }
}

fn major(This(this): This<Value>) -> ResolveResult {
    semver_part("major", &this, |v| v.0)
}

fn minor(This(this): This<Value>) -> ResolveResult {
    semver_part("minor", &this, |v| v.1)
}

fn patch(This(this): This<Value>) -> ResolveResult {
    semver_part("patch", &this, |v| v.2)
}

/// A compiled selector expression.
#[derive(Clone)]
pub struct Selector {
    pub expression: String,
    program: Arc<Program>,
}

impl std::fmt::Debug for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Selector")
            .field("expression", &self.expression)
            .finish()
    }
}

/// Why a selector cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CelError {
    #[error("CEL expression {expression:?} does not compile: {message}")]
    Compile { expression: String, message: String },
    #[error("CEL expression {expression:?} failed on device {device}: {message}")]
    Runtime {
        expression: String,
        device: String,
        message: String,
    },
    #[error("CEL expression {expression:?} returned {value} on device {device}, not a bool")]
    NotBool {
        expression: String,
        device: String,
        value: String,
    },
}

/// `CELSelectorExpressionMaxLength`.
pub const MAX_EXPRESSION_LEN: usize = 10 * 1024;

/// The deepest expression accepted, as counted by [`depth_bound`]. The CEL crate's parser and
/// evaluator recurse once per level: about 3,000 chained operators overflow a 2 MiB thread
/// stack (a tokio worker's) in a release build, which the 10 KiB length limit allows. A
/// claim author could crash the controller with one; real selectors stay far below this
/// (the examples' longest counts 15), and cel-go, which the API server validates with, stops
/// at a recursion depth of 250.
pub const MAX_EXPRESSION_DEPTH: usize = 100;

/// An upper bound of the depth of the syntax tree: the deepest bracket nesting plus every
/// operator character (each binary, unary, member or ternary operator can add a level, and a
/// chain of them nests left-deep). Strings are not skipped, which can only overcount: a
/// scanner that disagrees with the CEL lexer about where a string ends must not undercount.
/// Commas and colons separate siblings and add no depth.
pub fn depth_bound(expression: &str) -> usize {
    let (mut depth, mut deepest, mut operators) = (0usize, 0usize, 0usize);
    for b in expression.bytes() {
        match b {
            b'(' | b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b'.' | b'+' | b'-' | b'*' | b'/' | b'%' | b'!' | b'<' | b'>' | b'=' | b'&' | b'|'
            | b'?' => operators += 1,
            _ => {}
        }
    }
    deepest + operators
}

impl Selector {
    pub fn compile(expression: &str) -> Result<Selector, CelError> {
        if expression.len() > MAX_EXPRESSION_LEN {
            return Err(CelError::Compile {
                expression: expression.chars().take(64).collect(),
                message: format!("longer than {MAX_EXPRESSION_LEN} bytes"),
            });
        }
        let depth = depth_bound(expression);
        if depth > MAX_EXPRESSION_DEPTH {
            return Err(CelError::Compile {
                expression: expression.chars().take(64).collect(),
                message: format!(
                    "nests or chains operations {depth} deep, more than {MAX_EXPRESSION_DEPTH}"
                ),
            });
        }
        // The parser is not ours: a panic inside it must not take the controller down.
        let compiled = std::panic::catch_unwind(|| Program::compile(expression));
        match compiled {
            Ok(Ok(program)) => Ok(Selector {
                expression: expression.to_string(),
                program: Arc::new(program),
            }),
            Ok(Err(e)) => Err(CelError::Compile {
                expression: expression.to_string(),
                message: e.to_string(),
            }),
            Err(_) => Err(CelError::Compile {
                expression: expression.to_string(),
                message: "the CEL parser failed".into(),
            }),
        }
    }

    /// Evaluate against a device built by [`device_value`]: declares the library for this one
    /// evaluation, so callers that evaluate many times keep a [`CelEnv`] and a [`CelDevice`]
    /// per device and call [`Selector::evaluate`].
    pub fn matches(&self, device_name: &str, device: &Value) -> Result<bool, CelError> {
        let env = CelEnv::new().map_err(|e| self.runtime(device_name, e.to_string()))?;
        self.evaluate(&env, &CelDevice::new(device_name, device.clone()))
    }

    /// Evaluate against a prepared device with the shared library: nothing is declared,
    /// converted or cloned per evaluation.
    pub fn evaluate(&self, env: &CelEnv, device: &CelDevice) -> Result<bool, CelError> {
        let value = device
            .value
            .as_ref()
            .map_err(|e| self.runtime(&device.name, e.clone()))?;
        let resolver = DeviceResolver(value.as_ref());
        let mut ctx = env.root.new_inner_scope();
        ctx.set_variable_resolver(&resolver);
        let program = &self.program;
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| program.execute(&ctx)));
        match result {
            Ok(Ok(Value::Bool(b))) => Ok(b),
            Ok(Ok(other)) => Err(CelError::NotBool {
                expression: self.expression.clone(),
                device: device.name.clone(),
                value: format!("{other:?}"),
            }),
            Ok(Err(e)) => Err(self.runtime(&device.name, e.to_string())),
            Err(_) => Err(self.runtime(&device.name, "the CEL interpreter failed".into())),
        }
    }

    fn runtime(&self, device: &str, message: String) -> CelError {
        CelError::Runtime {
            expression: self.expression.clone(),
            device: device.to_string(),
            message,
        }
    }
}

/// The Kubernetes CEL library (quantities, semantic versions) declared once: building the
/// standard environment and declaring eleven functions cost more than evaluating a typical
/// selector, so an allocator keeps one for all its evaluations.
pub struct CelEnv {
    root: Context<'static, 'static>,
}

impl std::fmt::Debug for CelEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CelEnv").finish_non_exhaustive()
    }
}

/// Why the Kubernetes CEL library could not be declared.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("declaring the Kubernetes CEL library: {0}")]
pub struct LibraryError(String);

impl CelEnv {
    pub fn new() -> Result<CelEnv, LibraryError> {
        let mut root = Context::default();
        let declared = [
            root.add_function("quantity", quantity_fn),
            root.add_function("semver", semver_fn),
            root.add_function("isQuantity", is_quantity_fn),
            root.add_function("isSemver", is_semver_fn),
            root.add_function("compareTo", compare_to),
            root.add_function("isGreaterThan", is_greater_than),
            root.add_function("isLessThan", is_less_than),
            root.add_function("asInteger", as_integer),
            root.add_function("major", major),
            root.add_function("minor", minor),
            root.add_function("patch", patch),
        ];
        match declared.into_iter().find_map(Result::err) {
            Some(e) => Err(LibraryError(format!("{e:?}"))),
            None => Ok(CelEnv { root }),
        }
    }
}

/// A device's `device` variable in the interpreter's own representation, converted once:
/// binding a [`Value`] map converts it (deep-copying every nested map) on each binding.
#[derive(Debug)]
pub struct CelDevice {
    name: String,
    /// A conversion failure is kept and reported by every selector evaluated on the device.
    value: Result<Box<dyn Val>, String>,
}

impl CelDevice {
    pub fn new(name: &str, value: Value) -> CelDevice {
        CelDevice {
            name: name.to_string(),
            value: Box::<dyn Val>::try_from(value).map_err(|e| e.to_string()),
        }
    }

    /// The device of `driver` as selectors see it.
    pub fn of(driver: &str, device: &PublishedDevice) -> CelDevice {
        CelDevice::new(&device.name, device_value(driver, device))
    }
}

/// Answers `device` from a prepared value, lent rather than copied into the context.
struct DeviceResolver<'a>(&'a dyn Val);

impl VariableResolver for DeviceResolver<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        (variable == "device").then_some(CowVal::Borrowed(self.0))
    }
}

/// The `device` variable for a published device of `driver`: unprefixed attribute and
/// capacity names belong to the driver's domain.
pub fn device_value(driver: &str, device: &PublishedDevice) -> Value {
    let mut attributes: HashMap<String, HashMap<String, Value>> = HashMap::new();
    attributes.entry(driver.to_string()).or_default();
    for (name, value) in &device.attributes {
        let (domain, id) = name.split_once('/').unwrap_or((driver, name));
        let v = match value {
            AttributeValue::Int(i) => Value::Int(*i),
            AttributeValue::Bool(b) => Value::Bool(*b),
            AttributeValue::String(s) => Value::String(Arc::new(s.clone())),
            AttributeValue::Version(s) => match parse_semver(s) {
                Some(v) => Value::Opaque(Arc::new(v)),
                None => Value::String(Arc::new(s.clone())),
            },
        };
        attributes
            .entry(domain.to_string())
            .or_default()
            .insert(id.to_string(), v);
    }
    let mut capacity: HashMap<String, HashMap<String, Value>> = HashMap::new();
    capacity.entry(driver.to_string()).or_default();
    for (name, q) in &device.capacity {
        let (domain, id) = name.split_once('/').unwrap_or((driver, name));
        capacity
            .entry(domain.to_string())
            .or_default()
            .insert(id.to_string(), Value::Opaque(Arc::new(CelQuantity(*q))));
    }
    let to_map = |m: HashMap<String, HashMap<String, Value>>| {
        let outer: HashMap<String, Value> = m
            .into_iter()
            .map(|(k, v)| (k, Value::Map(v.into())))
            .collect();
        Value::Map(outer.into())
    };
    let mut map: HashMap<String, Value> = HashMap::new();
    map.insert("driver".into(), Value::String(Arc::new(driver.to_string())));
    map.insert("attributes".into(), to_map(attributes));
    map.insert("capacity".into(), to_map(capacity));
    map.insert(
        "allowMultipleAllocations".into(),
        Value::Bool(device.allow_multiple_allocations),
    );
    Value::Map(map.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vgpu_driver::slice::gpu_devices;

    fn h100() -> PublishedDevice {
        let inv =
            vgpu_driver::Inventory::from_yaml(include_str!("../../driver/testdata/hgx-h100.yaml"))
                .unwrap();
        gpu_devices(&inv.gpus).unwrap().remove(0)
    }

    fn eval(expr: &str) -> Result<bool, CelError> {
        let dev = h100();
        Selector::compile(expr)?.matches(&dev.name, &device_value("vgpu.hami.io", &dev))
    }

    #[test]
    fn kubernetes_dra_semantics() {
        assert_eq!(eval(r#"device.driver == "vgpu.hami.io""#), Ok(true));
        assert_eq!(eval(r#"device.driver == "gpu.nvidia.com""#), Ok(false));
        assert_eq!(
            eval(r#"device.attributes["vgpu.hami.io"].productName.startsWith("NVIDIA H100")"#),
            Ok(true)
        );
        assert_eq!(
            eval(r#"device.attributes["vgpu.hami.io"].index == 0"#),
            Ok(true)
        );
        assert_eq!(
            eval(r#"device.attributes["resource.kubernetes.io"].pciBusID == "0000:18:00.0""#),
            Ok(true)
        );
        assert_eq!(
            eval(r#"device.capacity["vgpu.hami.io"].memory.compareTo(quantity("40Gi")) >= 0"#),
            Ok(true)
        );
        assert_eq!(
            eval(r#"device.capacity["vgpu.hami.io"].memory.compareTo(quantity("81559Mi")) == 0"#),
            Ok(true)
        );
        assert_eq!(
            eval(r#"device.capacity["vgpu.hami.io"].memory.isGreaterThan(quantity("100Gi"))"#),
            Ok(false)
        );
        assert_eq!(
            eval(r#"device.capacity["vgpu.hami.io"].cores.asInteger() == 100"#),
            Ok(true)
        );
        assert_eq!(
            eval(r#"device.capacity["vgpu.hami.io"].memory == quantity("81559Mi")"#),
            Ok(true)
        );
        assert_eq!(
            eval(
                r#"device.attributes["vgpu.hami.io"].driverVersion.isGreaterThan(semver("550.0.0"))"#
            ),
            Ok(true)
        );
        assert_eq!(
            eval(
                r#"device.attributes["vgpu.hami.io"].cudaComputeCapability.compareTo(semver("9.0.0")) == 0"#
            ),
            Ok(true)
        );
        assert_eq!(
            eval(r#"device.attributes["vgpu.hami.io"].driverVersion.major() == 560"#),
            Ok(true)
        );
        assert_eq!(
            eval(r#"has(device.attributes["vgpu.hami.io"].allocatedByController)"#),
            Ok(false)
        );
        assert_eq!(
            eval(r#"has(device.attributes["vgpu.hami.io"].uuid)"#),
            Ok(true)
        );
        assert_eq!(
            eval(r#"device.attributes["vgpu.hami.io"].numaNode in [0, 1]"#),
            Ok(true)
        );
        assert_eq!(eval(r#"!device.allowMultipleAllocations"#), Ok(true));
        assert_eq!(
            eval(r#"semver("1.2.3-rc.1").isLessThan(semver("1.2.3"))"#),
            Ok(true)
        );
    }

    #[test]
    fn one_library_serves_every_device() {
        let inv =
            vgpu_driver::Inventory::from_yaml(include_str!("../../driver/testdata/hgx-h100.yaml"))
                .unwrap();
        let devices: Vec<CelDevice> = gpu_devices(&inv.gpus)
            .unwrap()
            .iter()
            .map(|d| CelDevice::of("vgpu.hami.io", d))
            .collect();
        let env = CelEnv::new().unwrap();
        let numa = Selector::compile(r#"device.attributes["vgpu.hami.io"].numaNode == 1"#).unwrap();
        let got: Vec<bool> = devices
            .iter()
            .map(|d| numa.evaluate(&env, d).unwrap())
            .collect();
        assert_eq!(got, [false, false, false, false, true, true, true, true]);
        // A comprehension variable named `device` shadows the device, as in cel-go.
        let shadow = Selector::compile("[1].exists(device, device == 1)").unwrap();
        assert_eq!(shadow.evaluate(&env, &devices[0]), Ok(true));
        // The library is declared once and used by every evaluation.
        let q = Selector::compile(
            r#"device.capacity["vgpu.hami.io"].memory.isGreaterThan(quantity("40Gi"))"#,
        )
        .unwrap();
        assert!(devices.iter().all(|d| q.evaluate(&env, d) == Ok(true)));
        // A device value the interpreter cannot hold fails every selector on it, naming it.
        let odd = CelDevice::new("gpu-x", Value::Function(Arc::new("f".into()), None));
        assert!(matches!(
            numa.evaluate(&env, &odd),
            Err(CelError::Runtime { device, .. }) if device == "gpu-x"
        ));
    }

    #[test]
    fn errors_are_reported_not_panicked() {
        assert!(matches!(
            eval("device.driver =="),
            Err(CelError::Compile { .. })
        ));
        assert!(matches!(
            eval(r#"device.attributes["vgpu.hami.io"].nope == 1"#),
            Err(CelError::Runtime { .. })
        ));
        assert!(matches!(
            eval(r#"quantity("4GB").isGreaterThan(quantity("1"))"#),
            Err(CelError::Runtime { .. })
        ));
        assert!(matches!(
            eval(r#"device.driver"#),
            Err(CelError::NotBool { .. })
        ));
        assert!(matches!(
            eval(&"1 == 1 && ".repeat(2000)),
            Err(CelError::Compile { .. })
        ));
        assert!(matches!(
            eval(r#"quantity("1").compareTo(semver("1.0.0")) == 0"#),
            Err(CelError::Runtime { .. })
        ));
    }

    /// On a thread with a release build's margin: a debug build's parser frames are tens of
    /// times larger, and the limit is sized for release.
    fn on_big_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new()
            .stack_size(512 << 20)
            .spawn(f)
            .unwrap()
            .join()
            .unwrap()
    }

    #[test]
    fn deep_expressions_are_refused_before_the_parser_sees_them() {
        // Each of these overflows a 2 MiB stack in a release build without the bound.
        for deep in [
            format!("1{} == 1", "+1".repeat(4000)),
            format!("{}true{}", "(".repeat(4000), ")".repeat(4000)),
            format!("{}true", "!".repeat(4000)),
            format!("{{}}{} == 1", ".a".repeat(4000)),
        ] {
            let err = Selector::compile(&deep).unwrap_err().to_string();
            assert!(err.contains("more than 100"), "{err}");
        }
        // At the bound: compiles and evaluates.
        let at = format!("1{} == 51", " + 1".repeat(50));
        assert_eq!(depth_bound(&at), 52);
        assert_eq!(on_big_stack(move || eval(&at)), Ok(true));
        let over = format!("1{} == 100", " + 1".repeat(99));
        assert!(Selector::compile(&over).is_err());
        // The shipped examples' selectors are far inside it.
        let example = r#"device.attributes["vgpu.hami.io"].productName.startsWith("NVIDIA H100") && device.capacity["vgpu.hami.io"].memory.compareTo(quantity("40Gi")) >= 0"#;
        assert!(depth_bound(example) < 25, "{}", depth_bound(example));
        assert_eq!(on_big_stack(move || eval(example)), Ok(true));
    }

    #[test]
    fn semver_parsing() {
        assert_eq!(parse_semver("1.2.3"), Some(Semver(1, 2, 3, String::new())));
        assert_eq!(
            parse_semver("1.2.3-beta+build"),
            Some(Semver(1, 2, 3, "beta".into()))
        );
        assert_eq!(parse_semver("01.2.3"), None);
        assert_eq!(parse_semver("1.2"), None);
        assert_eq!(parse_semver("1.2.3.4"), None);
    }
}
