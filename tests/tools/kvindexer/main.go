// Command kvindexer is llm-d's KV-cache indexer, run as the tests' real
// consumer of pagedinfer's KV-cache events.
//
// It subscribes to each server's ZeroMQ PUB socket through llm-d's own event
// pool (pkg/kvevents), which decodes vLLM's wire format and feeds llm-d's
// in-memory block index (pkg/kvcache/kvblock). An HTTP endpoint then scores
// a request's token ids the way llm-d's precise prefix scorer does:
// TokensToKVBlockKeys, Index.Lookup, and the longest-prefix score (each pod
// scores one per consecutive block, from the first, that it holds).
//
// The scoring steps are called here rather than through kvcache.Indexer
// because that package links a Hugging Face tokenizer (Rust, through cgo) and
// an embedded CPython for chat templates; the tests hand token ids, so
// tokenization is not under test.
//
//	kvindexer -listen 127.0.0.1:PORT -block-size 16 -pod a=tcp://127.0.0.1:5557 -pod b=...
//
//	POST /score {"model": "m", "token_ids": [..]} -> {"scores": {"a": 3}, "num_block_keys": 4}
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/llm-d/llm-d-kv-cache/pkg/kvcache/kvblock"
	"github.com/llm-d/llm-d-kv-cache/pkg/kvevents"
	"go.uber.org/zap/zapcore"
	"k8s.io/apimachinery/pkg/util/sets"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
)

type podFlags map[string]string

func (p podFlags) String() string { return fmt.Sprint(map[string]string(p)) }

func (p podFlags) Set(value string) error {
	name, endpoint, ok := strings.Cut(value, "=")
	if !ok || name == "" || endpoint == "" {
		return fmt.Errorf("want NAME=ENDPOINT, got %q", value)
	}
	p[name] = endpoint
	return nil
}

type scoreRequest struct {
	Model    string   `json:"model"`
	TokenIDs []uint32 `json:"token_ids"`
}

type scoreResponse struct {
	Scores       map[string]float64 `json:"scores"`
	NumBlockKeys int                `json:"num_block_keys"`
}

type indexer struct {
	index          kvblock.Index
	tokenProcessor kvblock.TokenProcessor
}

// longestPrefixScores is llm-d's LongestPrefixScorer with every medium
// weighted 1: a pod's score is the number of leading keys it holds.
func longestPrefixScores(keys []kvblock.BlockHash, keyToPods map[kvblock.BlockHash][]kvblock.PodEntry) map[string]float64 {
	scores := map[string]float64{}
	var active sets.Set[string]
	for i, key := range keys {
		holders := sets.New[string]()
		for _, entry := range keyToPods[key] {
			holders.Insert(entry.PodIdentifier)
		}
		if i == 0 {
			active = holders
		} else {
			active = active.Intersection(holders)
		}
		if active.Len() == 0 {
			break
		}
		for pod := range active {
			scores[pod]++
		}
	}
	return scores
}

func (x *indexer) score(w http.ResponseWriter, r *http.Request) {
	var req scoreRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	keys := x.tokenProcessor.TokensToKVBlockKeys(kvblock.EmptyBlockHash, req.TokenIDs, req.Model)
	resp := scoreResponse{Scores: map[string]float64{}, NumBlockKeys: len(keys)}
	if len(keys) > 0 {
		keyToPods, err := x.index.Lookup(r.Context(), keys, sets.New[string]())
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		resp.Scores = longestPrefixScores(keys, keyToPods)
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(resp)
}

func main() {
	pods := podFlags{}
	listen := flag.String("listen", "127.0.0.1:0", "HTTP address for /score")
	blockSize := flag.Int("block-size", 16, "tokens per KV block, as the servers run")
	hashSeed := flag.String("hash-seed", "", "llm-d's request-key seed")
	verbosity := flag.Int("v", 0, "log verbosity: 4 logs each dropped event, 5 each batch")
	flag.Var(pods, "pod", "NAME=ZMQ_ENDPOINT of a server's KV-event PUB socket (repeatable)")
	flag.Parse()
	if len(pods) == 0 {
		fmt.Fprintln(os.Stderr, "kvindexer: at least one -pod NAME=ENDPOINT is required")
		os.Exit(2)
	}

	logger := zap.New(zap.WriteTo(os.Stderr), zap.Level(zapcore.Level(-*verbosity)))
	log.SetLogger(logger)
	ctx, stop := signal.NotifyContext(log.IntoContext(context.Background(), logger), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	index, err := kvblock.NewIndex(ctx, kvblock.DefaultIndexConfig())
	if err != nil {
		fmt.Fprintln(os.Stderr, "kvindexer:", err)
		os.Exit(1)
	}
	tokenProcessor := kvblock.NewChunkedTokenDatabase(&kvblock.TokenProcessorConfig{BlockSize: *blockSize, HashSeed: *hashSeed})
	// One worker keeps each pod's batches in sequence order, as the pool's
	// per-pod sharding does with more.
	pool := kvevents.NewPool(&kvevents.Config{TopicFilter: "kv@", Concurrency: 1}, index, tokenProcessor)
	pool.Start(ctx)
	subscribers := kvevents.NewSubscriberManager(pool)
	for name, endpoint := range pods {
		if err := subscribers.EnsureSubscriber(ctx, name, endpoint, "kv@", true); err != nil {
			fmt.Fprintln(os.Stderr, "kvindexer:", err)
			os.Exit(1)
		}
	}

	x := &indexer{index: index, tokenProcessor: tokenProcessor}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /score", x.score)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusOK) })
	server := &http.Server{Addr: *listen, Handler: mux}
	go func() {
		<-ctx.Done()
		subscribers.Shutdown(context.Background())
		_ = server.Shutdown(context.Background())
	}()
	if err := server.ListenAndServe(); err != nil && err != http.ErrServerClosed {
		fmt.Fprintln(os.Stderr, "kvindexer:", err)
		os.Exit(1)
	}
	pool.Shutdown(context.Background())
}
