//go:build !kubelet132

package main

import (
	"context"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	drapbv1 "k8s.io/kubelet/pkg/apis/dra/v1"
	drapbv1beta1 "k8s.io/kubelet/pkg/apis/dra/v1beta1"
)

const release = "kubelet 1.34.4"

var supportedServices = []string{"v1", "v1beta1"}

// dialManager is the 1.34.4 DRA plugin manager's connection, the one every
// NodePrepare/NodeUnprepare uses (pkg/kubelet/cm/dra/plugin/dra_plugin_manager.go,
// add): grpc.NewClient on "unix:" + endpoint (so grpc-go's unix resolver, whose authority
// is "localhost"); the metrics interceptor and stats handler do not touch the wire.
func dialManager(endpoint string) (*grpc.ClientConn, error) {
	target := "unix:" + endpoint
	options := append([]grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
	}, extraDialOptions()...)
	return grpc.NewClient(target, options...)
}

// callDRA prepares and unprepares the claims over `service`, once on the plugin manager's
// connection and once on the leftover bare-path dial (the health stream's redial).
func callDRA(endpoint, service string, claims claims) {
	for _, dial := range []struct {
		name string
		fn   func(string) (*grpc.ClientConn, error)
	}{{"manager", dialManager}, {"legacy", dialLegacy}} {
		conn, err := dial.fn(endpoint)
		if err != nil {
			fail("dial %s (%s): %v", endpoint, dial.name, err)
		}
		prepare(conn, service, dial.name, claims)
		conn.Close()
	}
}

func prepare(conn *grpc.ClientConn, service, dial string, claims claims) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	switch service {
	case "v1":
		var req []*drapbv1.Claim
		for _, c := range claims {
			req = append(req, &drapbv1.Claim{Namespace: c.Namespace, Name: c.Name, UID: c.UID})
		}
		client := drapbv1.NewDRAPluginClient(conn)
		prep, err := client.NodePrepareResources(ctx, &drapbv1.NodePrepareResourcesRequest{Claims: req})
		if err != nil {
			fail("v1 NodePrepareResources (%s dial): %v", dial, err)
		}
		emit("v1.NodePrepareResources", dial, prep)
		unprep, err := client.NodeUnprepareResources(ctx, &drapbv1.NodeUnprepareResourcesRequest{Claims: req})
		if err != nil {
			fail("v1 NodeUnprepareResources (%s dial): %v", dial, err)
		}
		emit("v1.NodeUnprepareResources", dial, unprep)
	case "v1beta1":
		var req []*drapbv1beta1.Claim
		for _, c := range claims {
			req = append(req, &drapbv1beta1.Claim{Namespace: c.Namespace, Name: c.Name, UID: c.UID})
		}
		client := drapbv1beta1.NewDRAPluginClient(conn)
		prep, err := client.NodePrepareResources(ctx, &drapbv1beta1.NodePrepareResourcesRequest{Claims: req})
		if err != nil {
			fail("v1beta1 NodePrepareResources (%s dial): %v", dial, err)
		}
		emit("v1beta1.NodePrepareResources", dial, prep)
		unprep, err := client.NodeUnprepareResources(ctx, &drapbv1beta1.NodeUnprepareResourcesRequest{Claims: req})
		if err != nil {
			fail("v1beta1 NodeUnprepareResources (%s dial): %v", dial, err)
		}
		emit("v1beta1.NodeUnprepareResources", dial, unprep)
	default:
		fail("%s has no DRA service %q", release, service)
	}
}
