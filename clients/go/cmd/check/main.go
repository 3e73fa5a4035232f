// Command check runs the Go client against a live semrank server and checks what a backend relies on:
//
//	SEMRANK_ADDRESS=127.0.0.1:50051 SEMRANK_ITEMS=sku-1,sku-2,sku-3 [SEMRANK_TOKEN=...] semrank-check
//
// It prints one JSON line with what it saw and exits 1 on the first unmet expectation
// (tests/clients/test_go_client.py runs it in `make test` against a real server).
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/semrank/semrank/clients/go/semrank"
	rankingv1 "github.com/semrank/semrank/gen/go/semrank/ranking/v1"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/types/known/timestamppb"
)

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "check failed: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	address := os.Getenv("SEMRANK_ADDRESS")
	items := strings.Split(os.Getenv("SEMRANK_ITEMS"), ",")
	if address == "" || len(items) < 3 {
		fail("set SEMRANK_ADDRESS and SEMRANK_ITEMS (at least 3 item ids)")
	}
	c, err := semrank.Connect(address, os.Getenv("SEMRANK_TOKEN"))
	if err != nil {
		fail("connect: %v", err)
	}
	defer c.Close()
	ctx := context.Background()
	seen := map[string]interface{}{}

	health, err := c.Health(ctx, "")
	if err != nil || health != healthpb.HealthCheckResponse_SERVING {
		fail("health: %v %v", health, err)
	}
	seen["health"] = health.String()

	suffix := make([]byte, 8)
	rand.Read(suffix)
	user := "go-user-" + hex.EncodeToString(suffix)
	cands := make([]*rankingv1.RankCandidate, len(items))
	for k, id := range items {
		cands[k] = &rankingv1.RankCandidate{ItemId: id}
	}
	ranked, err := c.Rank(ctx, &rankingv1.RankRequest{UserId: user, Candidates: cands, Explain: true})
	if err != nil {
		fail("rank: %v", err)
	}
	got := make([]string, 0, len(ranked.Items))
	for k, it := range ranked.Items {
		if int(it.Rank) != k+1 {
			fail("rank %d at position %d", it.Rank, k+1)
		}
		got = append(got, it.ItemId)
	}
	want := append([]string(nil), items...)
	sort.Strings(got)
	sort.Strings(want)
	if strings.Join(got, ",") != strings.Join(want, ",") {
		fail("ranked items %v, want %v", got, want)
	}
	seen["modelVersion"] = ranked.ModelVersion

	// Events with ids: a retried call is stored once.
	events := make([]*rankingv1.Event, 3)
	for k := range events {
		kind := rankingv1.EventType_EVENT_TYPE_CLICK
		if k == 2 {
			kind = rankingv1.EventType_EVENT_TYPE_PURCHASE
		}
		events[k] = &rankingv1.Event{EventId: fmt.Sprintf("%s-e%d", user, k), Ts: timestamppb.Now(), UserId: user,
			ItemId: items[k], Type: kind}
	}
	first, err := c.LogEvents(ctx, events, 2)
	if err != nil {
		fail("log events: %v", err)
	}
	retry, err := c.LogEvents(ctx, events, 2)
	if err != nil {
		fail("log events (retry): %v", err)
	}
	seen["logEvents"] = map[string]interface{}{
		"first": map[string]int64{"accepted": first.Accepted, "duplicates": first.Duplicates},
		"retry": map[string]int64{"accepted": retry.Accepted, "duplicates": retry.Duplicates},
	}
	if first.Accepted != 3 || retry.Accepted != 0 || retry.Duplicates != 3 {
		fail("log events: first %v, retry %v", first, retry)
	}
	if _, err := c.LogEvents(ctx, []*rankingv1.Event{{UserId: user, ItemId: items[0]}}, 1); err == nil {
		fail("an event without an id was sent")
	}

	// A bad request: INVALID_ARGUMENT with ErrorInfo and the BadRequest field violations decoded.
	_, err = c.Rank(ctx, &rankingv1.RankRequest{})
	rich, ok := semrank.Rich(err)
	if err == nil || !ok {
		fail("an empty Rank request was accepted (%v)", err)
	}
	seen["invalid"] = rich
	fields := []string{}
	for _, v := range rich.FieldViolations {
		fields = append(fields, v.Field)
	}
	if rich.Code != codes.InvalidArgument || rich.Reason != "INVALID_REQUEST" || rich.Domain != "semrank" ||
		strings.Join(fields, ",") != "user_id,candidates" {
		fail("invalid request: %+v", rich)
	}
	out, _ := json.Marshal(seen)
	fmt.Println(string(out))
}
