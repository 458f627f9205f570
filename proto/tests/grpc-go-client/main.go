// Command grpc-go-client talks to a DRA kubelet plugin exactly the way the kubelet does: the
// same grpc-go release as the kubelet it stands for, the same dial targets, dialers and dial
// options (copied from the kubelet sources named below), and the kubelet's own generated API
// packages. It exists to catch what a tonic-to-tonic test cannot: what grpc-go puts on the
// wire, in particular the HTTP/2 `:authority` it derives from a bare socket path.
//
// Two builds, one per kubelet release (see the test that builds them,
// kubelet-plugin/tests/grpc_go_client.rs):
//
//	kubelet 1.34.4: go.mod,          google.golang.org/grpc v1.72.1, k8s.io/kubelet v0.34.4
//	kubelet 1.32.13: kubelet-1.32.mod (-modfile, -tags kubelet132), grpc v1.65.0, k8s.io/kubelet v0.32.13
//
// It prints one JSON object per call on stdout and exits non-zero on the first RPC error.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// claim is one -claim flag: namespace/name/uid.
type claim struct{ Namespace, Name, UID string }

type claims []claim

func (c *claims) String() string { return fmt.Sprint(*c) }

func (c *claims) Set(v string) error {
	parts := strings.Split(v, "/")
	if len(parts) != 3 {
		return fmt.Errorf("want namespace/name/uid, got %q", v)
	}
	*c = append(*c, claim{parts[0], parts[1], parts[2]})
	return nil
}

var (
	registration = flag.String("registration", "", "registration socket: GetInfo and NotifyRegistrationStatus, dialled as the plugin watcher does")
	dra          = flag.String("dra", "", "DRA socket: NodePrepareResources and NodeUnprepareResources, dialled as this release's DRA manager does")
	services     = flag.String("services", "", "comma-separated DRA services to call (v1beta1, v1); default: all this release has")
	authority    = flag.String("authority", "", "add grpc.WithAuthority(this) to every dial (not what the kubelet does: for the grpc-go releases that sent the socket path itself)")
	claimFlags   claims
)

// extraDialOptions are the test's additions to the kubelet's dial options (none by default).
func extraDialOptions() []grpc.DialOption {
	if *authority == "" {
		return nil
	}
	return []grpc.DialOption{grpc.WithAuthority(*authority)}
}

// dialRegistration is the plugin watcher's dial, identical in 1.32.13 and 1.34.4
// (pkg/kubelet/pluginmanager/operationexecutor/operation_generator.go, func dial): the bare
// socket path as target, a blocking dial through a custom "unix" dialer, no authority.
func dialRegistration(unixSocketPath string, timeout time.Duration) (registerapi.RegistrationClient, *grpc.ClientConn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()

	//nolint:staticcheck // as the kubelet does
	c, err := grpc.DialContext(ctx, unixSocketPath, append([]grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithBlock(),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", addr)
		}),
	}, extraDialOptions()...)...)
	if err != nil {
		return nil, nil, fmt.Errorf("failed to dial socket %s, err: %v", unixSocketPath, err)
	}
	return registerapi.NewRegistrationClient(c), c, nil
}

// dialLegacy is the DRA client's own dial in 1.32.13 (pkg/kubelet/cm/dra/plugin/plugin.go,
// getOrCreateGRPCConn: the connection of every NodePrepare/NodeUnprepare) and its leftover in
// 1.34.4 (pkg/kubelet/cm/dra/plugin/dra_plugin.go, getOrCreateGRPCConn: redials a shut-down
// connection for the health stream): the bare endpoint path and a custom "unix" dialer.
func dialLegacy(endpoint string) (*grpc.ClientConn, error) {
	network := "unix"
	//nolint:staticcheck // as the kubelet does
	conn, err := grpc.Dial(endpoint, append([]grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, target string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, target)
		}),
	}, extraDialOptions()...)...)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if ok := conn.WaitForStateChange(ctx, connectivity.Connecting); !ok {
		return nil, fmt.Errorf("timed out waiting for gRPC connection to be ready")
	}
	return conn, nil
}

// emit prints one call's result as a JSON line.
func emit(call, dial string, response any) {
	line, err := json.Marshal(map[string]any{"call": call, "dial": dial, "response": response})
	if err != nil {
		fail("%s: encode the response: %v", call, err)
	}
	fmt.Println(string(line))
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "grpc-go-client (%s): "+format+"\n", append([]any{release}, args...)...)
	os.Exit(1)
}

func register(socketPath string) {
	client, conn, err := dialRegistration(socketPath, 10*time.Second)
	if err != nil {
		fail("RegisterPlugin error -- dial failed at socket %s, err: %v", socketPath, err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	info, err := client.GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		fail("RegisterPlugin error -- failed to get plugin info using RPC GetInfo at socket %s, err: %v", socketPath, err)
	}
	emit("GetInfo", "registration", info)
	status, err := client.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: true})
	if err != nil {
		fail("NotifyRegistrationStatus at socket %s: %v", socketPath, err)
	}
	emit("NotifyRegistrationStatus", "registration", status)
}

func main() {
	flag.Var(&claimFlags, "claim", "namespace/name/uid of a claim to prepare and unprepare (repeatable)")
	flag.Parse()
	if *registration == "" && *dra == "" {
		fail("nothing to do: give -registration and/or -dra")
	}
	if *registration != "" {
		register(*registration)
	}
	if *dra != "" {
		wanted := supportedServices
		if *services != "" {
			wanted = strings.Split(*services, ",")
		}
		for _, service := range wanted {
			callDRA(*dra, service, claimFlags)
		}
	}
}
