//! End-to-end tests against the cluster in KUBECONFIG live in tests/.
