//go:build kubelet132

package main

import (
	"context"
	"time"

	drapbv1beta1 "k8s.io/kubelet/pkg/apis/dra/v1beta1"
)

const release = "kubelet 1.32.13"

// 1.32 also speaks v1alpha4, which this driver does not offer.
var supportedServices = []string{"v1beta1"}

// callDRA prepares and unprepares the claims over `service` on the one connection 1.32.13's
// DRA client has: the bare-path dial (pkg/kubelet/cm/dra/plugin/plugin.go).
func callDRA(endpoint, service string, claims claims) {
	if service != "v1beta1" {
		fail("%s has no DRA service %q", release, service)
	}
	conn, err := dialLegacy(endpoint)
	if err != nil {
		fail("dial %s: %v", endpoint, err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var req []*drapbv1beta1.Claim
	for _, c := range claims {
		req = append(req, &drapbv1beta1.Claim{Namespace: c.Namespace, Name: c.Name, UID: c.UID})
	}
	client := drapbv1beta1.NewDRAPluginClient(conn)
	prep, err := client.NodePrepareResources(ctx, &drapbv1beta1.NodePrepareResourcesRequest{Claims: req})
	if err != nil {
		fail("v1beta1 NodePrepareResources (legacy dial): %v", err)
	}
	emit("v1beta1.NodePrepareResources", "legacy", prep)
	unprep, err := client.NodeUnprepareResources(ctx, &drapbv1beta1.NodeUnprepareResourcesRequest{Claims: req})
	if err != nil {
		fail("v1beta1 NodeUnprepareResources (legacy dial): %v", err)
	}
	emit("v1beta1.NodeUnprepareResources", "legacy", unprep)
}
