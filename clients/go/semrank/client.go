// Package semrank is a small Go client of the semrank ranking service (semrank.ranking.v1).
//
//	c, err := semrank.Connect("127.0.0.1:50051", os.Getenv("SEMRANK_TOKEN"))
//	resp, err := c.Rank(ctx, &rankingv1.RankRequest{UserId: "u1", Candidates: cands})
//	if rich, ok := semrank.Rich(err); ok { ... rich.Reason, rich.FieldViolations ... }
//
// Every call carries a deadline (Timeout unless the context has one); LogEvents sends events
// with ids, so a retried call after any failure is stored once (see docs/serving.md, "Exactly once").
package semrank

import (
	"context"
	"fmt"
	"time"

	rankingv1 "github.com/semrank/semrank/gen/go/semrank/ranking/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// Timeout is the deadline of a call whose context has none.
const Timeout = 10 * time.Second

// Client holds one channel to a semrank server.
type Client struct {
	conn   *grpc.ClientConn
	token  string
	Rpc    rankingv1.RankingServiceClient
	health healthpb.HealthClient
}

// Connect opens a plaintext channel (use grpc.WithTransportCredentials for TLS in production);
// token, when not empty, is sent as "authorization: Bearer <token>" on every call.
func Connect(address, token string) (*Client, error) {
	conn, err := grpc.Dial(address, grpc.WithInsecure())
	if err != nil {
		return nil, err
	}
	return &Client{conn: conn, token: token, Rpc: rankingv1.NewRankingServiceClient(conn),
		health: healthpb.NewHealthClient(conn)}, nil
}

// Close closes the channel.
func (c *Client) Close() error { return c.conn.Close() }

func (c *Client) ctx(parent context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := parent, context.CancelFunc(func() {})
	if _, ok := parent.Deadline(); !ok {
		ctx, cancel = context.WithTimeout(parent, Timeout)
	}
	if c.token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+c.token)
	}
	return ctx, cancel
}

// Rank ranks the request's candidates for its user.
func (c *Client) Rank(parent context.Context, req *rankingv1.RankRequest) (*rankingv1.RankResponse, error) {
	ctx, cancel := c.ctx(parent)
	defer cancel()
	return c.Rpc.Rank(ctx, req)
}

// LogEvents streams the events in messages of at most batch events and returns the server's
// counts. Give every event an EventId: a resend after any error is then stored once.
func (c *Client) LogEvents(parent context.Context, events []*rankingv1.Event, batch int) (*rankingv1.LogEventsResponse, error) {
	for _, e := range events {
		if e.EventId == "" {
			return nil, fmt.Errorf("event of user %q has no event_id: a retry would count it twice", e.UserId)
		}
	}
	if batch < 1 {
		batch = 500
	}
	ctx, cancel := c.ctx(parent)
	defer cancel()
	stream, err := c.Rpc.LogEvents(ctx)
	if err != nil {
		return nil, err
	}
	for start := 0; start < len(events); start += batch {
		end := start + batch
		if end > len(events) {
			end = len(events)
		}
		if err := stream.Send(&rankingv1.LogEventsRequest{Events: events[start:end]}); err != nil {
			break // the server ended the stream; CloseAndRecv returns its status
		}
	}
	return stream.CloseAndRecv()
}

// Health returns the serving status of a health name ("" is the whole server; "semrank.readiness"
// reflects the dependencies).
func (c *Client) Health(parent context.Context, service string) (healthpb.HealthCheckResponse_ServingStatus, error) {
	ctx, cancel := c.ctx(parent)
	defer cancel()
	resp, err := c.health.Check(ctx, &healthpb.HealthCheckRequest{Service: service})
	if err != nil {
		return healthpb.HealthCheckResponse_UNKNOWN, err
	}
	return resp.Status, nil
}

// FieldViolation is one field of a request that failed validation.
type FieldViolation struct {
	Field       string `json:"field"`
	Description string `json:"description"`
}

// RichError is a semrank error status with its details decoded: the ErrorInfo reason (what to do:
// retry, back off, do not resend, fix the request) and the BadRequest field violations.
type RichError struct {
	Code            codes.Code        `json:"code"`
	Message         string            `json:"message"`
	Reason          string            `json:"reason"`
	Domain          string            `json:"domain"`
	Metadata        map[string]string `json:"metadata"`
	FieldViolations []FieldViolation  `json:"fieldViolations"`
}

// Rich decodes err's status details; ok is false for an error that carries no gRPC status.
func Rich(err error) (*RichError, bool) {
	st, ok := status.FromError(err)
	if !ok || st == nil {
		return nil, false
	}
	out := &RichError{Code: st.Code(), Message: st.Message(), Metadata: map[string]string{}, FieldViolations: []FieldViolation{}}
	for _, d := range st.Details() {
		switch v := d.(type) {
		case *errdetails.ErrorInfo:
			out.Reason, out.Domain = v.Reason, v.Domain
			for k, val := range v.Metadata {
				out.Metadata[k] = val
			}
		case *errdetails.BadRequest:
			for _, fv := range v.FieldViolations {
				out.FieldViolations = append(out.FieldViolations, FieldViolation{fv.Field, fv.Description})
			}
		}
	}
	return out, true
}
