//! Protocol-level checks of the simulator over real HTTP on loopback: SSE framing, `[DONE]`,
//! Anthropic event order, Ollama NDJSON, error shapes, metrics, stats and injected faults.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use batchagent::sim::{SimConfig, SimServer};
use serde_json::{json, Value};

async fn start(options: &str) -> SimServer {
    let config =
        SimConfig::from_url(&format!("sim://?profile=h100-qwen2.5-0.5b&time_scale=0&seed=7&{options}")).unwrap();
    SimServer::start(config).await.unwrap()
}

fn weather_tools() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                       "required": ["city", "unit"]}}}])
}

async fn post(url: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

async fn json_of(resp: reqwest::Response) -> Value {
    serde_json::from_str(&resp.text().await.unwrap()).unwrap()
}

/// Split an SSE body into events, checking the framing: every event ends with a blank line and
/// carries one `data:` line (and at most one `event:` line).
fn sse_events(text: &str) -> Vec<(Option<String>, String)> {
    assert!(text.ends_with("\n\n"), "SSE body must end with a blank line: {text:?}");
    text.trim_end_matches("\n\n")
        .split("\n\n")
        .map(|block| {
            let mut event = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    assert!(event.replace(e.to_owned()).is_none(), "two event lines in {block:?}");
                } else if let Some(d) = line.strip_prefix("data: ") {
                    assert!(data.replace(d.to_owned()).is_none(), "two data lines in {block:?}");
                } else {
                    panic!("unexpected SSE line {line:?}");
                }
            }
            (event, data.expect("an SSE event without data"))
        })
        .collect()
}

#[tokio::test]
async fn openai_chat_stream_frames_tool_calls_usage_and_done() {
    let sim = start("tool_rounds=1").await;
    let resp = post(
        &format!("{}/v1/chat/completions", sim.url()),
        &json!({"model": "sim-model", "stream": true, "stream_options": {"include_usage": true},
                "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": weather_tools()}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let events = sse_events(&resp.text().await.unwrap());
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|(_, d)| serde_json::from_str(d).unwrap()).collect();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut name = String::new();
    let mut args = String::new();
    for c in &chunks {
        for tc in c["choices"][0]["delta"]["tool_calls"].as_array().into_iter().flatten() {
            assert_eq!(tc["index"], 0);
            if let Some(n) = tc["function"]["name"].as_str() {
                assert!(tc["id"].as_str().unwrap().starts_with("call_"));
                assert_eq!(tc["type"], "function");
                name.push_str(n);
            }
            args.push_str(tc["function"]["arguments"].as_str().unwrap());
        }
    }
    assert_eq!(name, "get_weather");
    let args: Value = serde_json::from_str(&args).unwrap();
    assert!(args["city"].is_string() && (args["unit"] == "c" || args["unit"] == "f"));
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert!(usage["usage"]["prompt_tokens"].as_u64().unwrap() > 50);
    assert!(usage["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64());
    sim.stop().await;
}

#[tokio::test]
async fn openai_chat_non_stream_checks_n_model_request_id_and_length() {
    let sim = start("output_tokens=fixed:40").await;
    let url = format!("{}/v1/chat/completions", sim.url());
    let client = reqwest::Client::new();
    let resp = client
        .post(&url)
        .header("X-Request-Id", "job-17-turn-2")
        .header("content-type", "application/json")
        .body(
            json!({"model": "sim-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 7})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "job-17-turn-2");
    let body: Value = json_of(resp).await;
    assert_eq!(body["id"], "chatcmpl-job-17-turn-2");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 7);
    assert_eq!(body["usage"]["total_tokens"].as_u64().unwrap(), body["usage"]["prompt_tokens"].as_u64().unwrap() + 7);

    let resp = post(&url, &json!({"model": "sim-model", "n": 2, "messages": [{"role": "user", "content": "x"}]})).await;
    assert_eq!(resp.status(), 400);
    let err: Value = json_of(resp).await;
    assert_eq!(err["error"]["param"], "n");
    for key in ["message", "type", "param", "code"] {
        assert!(err["error"].get(key).is_some(), "error.{key} missing: {err}");
    }
    // Unpinned, any model name is served and echoed; pinned with `model=`, others are 404.
    let resp = post(&url, &json!({"model": "qwen2.5-7b", "messages": [{"role": "user", "content": "x"}]})).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(json_of(resp).await["model"], "qwen2.5-7b");
    let pinned = start("model=sim-model").await;
    let pinned_url = format!("{}/v1/chat/completions", pinned.url());
    let resp = post(&pinned_url, &json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})).await;
    assert_eq!(resp.status(), 404);
    pinned.stop().await;

    let schema = json!({"type": "object", "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 5}}, "required": ["score"]});
    let body: Value = json_of(post(
        &url,
        &json!({"model": "sim-model", "messages": [{"role": "user", "content": "rate"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema, "strict": true}}}),
    ).await).await;
    let answer: Value = serde_json::from_str(body["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert!((1..=5).contains(&answer["score"].as_i64().unwrap()));
    sim.stop().await;
}

#[tokio::test]
async fn openai_tool_choice_is_honoured() {
    let sim = start("tool_rounds=0").await;
    let url = format!("{}/v1/chat/completions", sim.url());
    let mut tools = weather_tools();
    tools.as_array_mut().unwrap().push(json!({"type": "function", "function": {"name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}));
    let ask = |choice: Value| {
        json!({"model": "sim-model", "tools": tools, "tool_choice": choice,
        "messages": [{"role": "user", "content": "now?"}]})
    };
    let auto = json_of(post(&url, &ask(json!("auto"))).await).await;
    assert_eq!(auto["choices"][0]["finish_reason"], "stop", "tool_rounds=0 answers at once: {auto}");
    let named = json_of(post(&url, &ask(json!({"type": "function", "function": {"name": "get_time"}}))).await).await;
    assert_eq!(named["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "get_time");
    let required = json_of(post(&url, &ask(json!("required"))).await).await;
    assert_eq!(required["choices"][0]["finish_reason"], "tool_calls");
    let missing = post(&url, &ask(json!({"type": "function", "function": {"name": "nope"}}))).await;
    assert_eq!(missing.status(), 400);
    assert!(json_of(missing).await["error"]["message"].as_str().unwrap().contains("nope"));
    sim.stop().await;
}

#[tokio::test]
async fn completions_take_a_list_of_prompts() {
    let sim = start("").await;
    let url = format!("{}/v1/completions", sim.url());
    let body: Value =
        json_of(post(&url, &json!({"model": "sim-model", "prompt": ["a", "b", "c"], "max_tokens": 5})).await).await;
    let idx: Vec<u64> = body["choices"].as_array().unwrap().iter().map(|c| c["index"].as_u64().unwrap()).collect();
    assert_eq!(idx, vec![0, 1, 2]);
    assert_eq!(body["usage"]["completion_tokens"], 15);

    let resp = post(&url, &json!({"model": "sim-model", "prompt": ["a", "b"], "max_tokens": 3, "stream": true})).await;
    let events = sse_events(&resp.text().await.unwrap());
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let mut finished = vec![];
    for (_, d) in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(d).unwrap();
        assert_eq!(c["object"], "text_completion");
        if c["choices"][0]["finish_reason"].is_string() {
            finished.push(c["choices"][0]["index"].as_u64().unwrap());
        }
    }
    finished.sort_unstable();
    assert_eq!(finished, vec![0, 1]);
    sim.stop().await;
}

/// A chat template's rendering on `/completions` is read as the chat it is: with tools in the
/// prompt the scripted agent calls them, as raw text in the prompt's own form (vLLM parses no tool
/// calls there), and once the results are in the prompt it answers.
#[tokio::test]
async fn completions_answer_templated_prompts_with_tool_calls_as_text() {
    use batchagent::chat_template::{ChatTemplate, ToolCallFormat};
    use batchagent::conversation::{Message, Role, ToolCall, ToolDef};

    let sim = start("tool_rounds=1").await;
    let url = format!("{}/v1/completions", sim.url());
    let tools: Vec<ToolDef> = serde_json::from_value(
        weather_tools().as_array().unwrap().iter().map(|t| t["function"].clone()).collect::<Vec<_>>().into(),
    )
    .unwrap();
    let messages = vec![Message::system("S"), Message::user("weather in Paris?")];
    for (template, format) in [
        (ChatTemplate::ChatMl, ToolCallFormat::Hermes),
        (ChatTemplate::Llama31 { today: false }, ToolCallFormat::LlamaJson),
    ] {
        let first = template.render(&messages, &tools).unwrap().unwrap();
        let body =
            json_of(post(&url, &json!({"model": "sim-model", "prompt": [first], "max_tokens": 500})).await).await;
        let text = body["choices"][0]["text"].as_str().unwrap().to_owned();
        let (_, calls) = format.parse(&text);
        assert_eq!(calls.len(), 1, "{template:?}: {text}");
        assert_eq!(calls[0].name, "get_weather");
        let args: Value = serde_json::from_str(&calls[0].arguments).unwrap();
        assert!(args["city"].is_string() && args["unit"].is_string(), "{args}");
        // The call's tokens are completion tokens: the whole text, markup included.
        assert_eq!(
            body["usage"]["completion_tokens"].as_u64().unwrap() as usize,
            batchagent::sim::tokenizer::count(&text)
        );

        let mut after = messages.clone();
        let call = ToolCall { id: "c".into(), name: calls[0].name.clone(), arguments: calls[0].arguments.clone() };
        after.push(Message::assistant("", vec![call]));
        let mut result = Message::user("18 C");
        result.role = Role::Tool;
        after.push(result);
        let second = template.render(&after, &tools).unwrap().unwrap();
        assert!(second.starts_with(&first[..first.find("weather in Paris?").unwrap()]));
        let body =
            json_of(post(&url, &json!({"model": "sim-model", "prompt": [second], "max_tokens": 500})).await).await;
        let text = body["choices"][0]["text"].as_str().unwrap();
        assert!(!text.is_empty() && format.parse(text).1.is_empty(), "{template:?}: {text}");
    }
    sim.stop().await;
}

#[tokio::test]
async fn anthropic_stream_event_order_and_tool_use() {
    let sim = start("").await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/messages", sim.url()))
        .header("x-api-key", "k")
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(json!({"model": "sim-model", "max_tokens": 256, "stream": true,
            "system": [{"type": "text", "text": "You are a weather bot."}],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}],
            "messages": [{"role": "user", "content": "Paris?"}]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let events = sse_events(&resp.text().await.unwrap());
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_deref().unwrap()).collect();
    for ((name, data), n) in events.iter().zip(&names) {
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["type"].as_str(), Some(*n), "event name and data type differ: {name:?}");
    }
    assert_eq!(names[0], "message_start");
    assert_eq!(names[1], "content_block_start");
    assert_eq!(names[2], "ping");
    assert_eq!(&names[names.len() - 3..], ["content_block_stop", "message_delta", "message_stop"]);
    let partial: String = events
        .iter()
        .filter_map(|(_, d)| {
            let v: Value = serde_json::from_str(d).unwrap();
            v["delta"]["partial_json"].as_str().map(str::to_owned)
        })
        .collect();
    let input: Value = serde_json::from_str(&partial).unwrap();
    assert!(input["city"].is_string());
    let delta: Value = serde_json::from_str(&events[events.len() - 2].1).unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    assert!(delta["usage"]["output_tokens"].as_u64().unwrap() > 0);

    let text = post(
        &format!("{}/v1/messages", sim.url()),
        &json!({"model": "sim-model", "max_tokens": 64, "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .text()
    .await
    .unwrap();
    let names: Vec<String> = sse_events(&text).into_iter().map(|(e, _)| e.unwrap()).collect();
    assert_eq!(names[..4], ["message_start", "content_block_start", "ping", "content_block_delta"]);
    assert_eq!(names.iter().filter(|n| *n == "ping").count(), 1);

    let resp = post(&format!("{}/v1/messages", sim.url()), &json!({"model": "sim-model", "messages": []})).await;
    assert_eq!(resp.status(), 400);
    let err: Value = json_of(resp).await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["error"]["type"], "invalid_request_error");
    sim.stop().await;
}

#[tokio::test]
async fn anthropic_cache_control_creates_then_reads() {
    let sim = start("cache_min_tokens=100").await;
    let long = "Shared instructions for every reviewer. ".repeat(60);
    let body = |q: &str| {
        json!({"model": "sim-model", "max_tokens": 50,
               "system": [{"type": "text", "text": long, "cache_control": {"type": "ephemeral"}}],
               "messages": [{"role": "user", "content": q}], "sim": {"output_tokens": "fixed:5"}})
    };
    let url = format!("{}/v1/messages", sim.url());
    let first: Value = json_of(post(&url, &body("one")).await).await;
    let second: Value = json_of(post(&url, &body("two")).await).await;
    let created = first["usage"]["cache_creation_input_tokens"].as_u64().unwrap();
    assert!(created > 200, "{first}");
    assert_eq!(first["usage"]["cache_read_input_tokens"], 0);
    assert_eq!(second["usage"]["cache_read_input_tokens"].as_u64().unwrap(), created);
    assert_eq!(second["usage"]["cache_creation_input_tokens"], 0);
    assert!(second["usage"]["input_tokens"].as_u64().unwrap() < created);
    sim.stop().await;
}

#[tokio::test]
async fn ollama_streams_ndjson_and_tool_calls() {
    let sim = start("").await;
    let url = format!("{}/api/chat", sim.url());
    let resp = post(&url, &json!({"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]})).await;
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("application/x-ndjson"));
    let text = resp.text().await.unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.len() > 2);
    assert!(lines[..lines.len() - 1].iter().all(|l| l["done"] == false));
    let last = lines.last().unwrap();
    assert_eq!(last["done"], true);
    assert_eq!(last["done_reason"], "stop");
    assert!(last["prompt_eval_count"].as_u64().unwrap() > 0);
    assert_eq!(last["eval_count"].as_u64().unwrap() as usize, lines.len() - 1);
    assert!(last["total_duration"].as_u64().unwrap() > 0);

    let body: Value = json_of(
        post(
            &url,
            &json!({"model": "sim-model", "stream": false, "tools": weather_tools(),
                "messages": [{"role": "user", "content": "weather?"}]}),
        )
        .await,
    )
    .await;
    let call = &body["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], "get_weather");
    assert!(call["arguments"]["city"].is_string(), "arguments must be an object: {body}");
    let tags: Value = json_of(reqwest::get(format!("{}/api/tags", sim.url())).await.unwrap()).await;
    assert_eq!(tags["models"][0]["name"], "sim-model");
    sim.stop().await;
}

#[tokio::test]
async fn health_models_metrics_and_stats() {
    let sim = start("").await;
    let health = reqwest::get(format!("{}/health", sim.url())).await.unwrap();
    assert_eq!(health.status(), 200);
    assert!(health.text().await.unwrap().is_empty());
    let models: Value = json_of(reqwest::get(format!("{}/v1/models", sim.url())).await.unwrap()).await;
    assert_eq!(models["data"][0]["id"], "sim-model");
    let prefix = "You are a careful code reviewer. Follow the checklist exactly. ".repeat(40);
    for q in ["a", "b"] {
        let body: Value = json_of(post(
            &format!("{}/v1/chat/completions", sim.url()),
            &json!({"model": "sim-model", "messages": [{"role": "system", "content": prefix}, {"role": "user", "content": q}]}),
        ).await).await;
        let cached = body["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
        if q == "a" {
            assert_eq!(cached, 0);
        } else {
            assert!(cached >= 512, "the shared system prompt should hit the prefix cache: {body}");
        }
    }
    let metrics = reqwest::get(format!("{}/metrics", sim.url())).await.unwrap().text().await.unwrap();
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:gpu_cache_usage_perc",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds",
        "vllm:request_success_total",
    ] {
        assert!(metrics.contains(&format!("# HELP {name} ")), "{name} HELP missing");
        assert!(metrics.contains(&format!("# TYPE {name} ")), "{name} TYPE missing");
    }
    let hits: f64 = metrics
        .lines()
        .find(|l| l.starts_with("vllm:prefix_cache_hits_total{"))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(hits >= 512.0);
    assert!(metrics.contains("vllm:time_to_first_token_seconds_bucket{le=\"+Inf\",model_name=\"sim-model\"} 2"));
    assert!(metrics.contains("vllm:time_to_first_token_seconds_count{model_name=\"sim-model\"} 2"));
    let stats: Value = json_of(reqwest::get(format!("{}/sim/stats", sim.url())).await.unwrap()).await;
    assert_eq!(stats["routes"]["/v1/chat/completions"]["by_status"]["200"], 2);
    assert_eq!(stats["requests_finished"], 2);
    assert_eq!(stats["ttft_seconds"]["count"], 2);
    assert_eq!(stats["cache"]["hit_requests"], 1);
    sim.stop().await;
}

#[tokio::test]
async fn faults_break_responses_as_configured() {
    let msg = json!({"model": "sim-model", "messages": [{"role": "user", "content": "x"}], "stream": true});

    let sim = start("fault_429=1&retry_after=3").await;
    let resp = post(&format!("{}/v1/chat/completions", sim.url()), &msg).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "3");
    let stats = sim.stats();
    assert_eq!(stats["faults"]["429"], 1);
    sim.stop().await;

    let sim = start("fault_truncate=1").await;
    let text = post(&format!("{}/v1/chat/completions", sim.url()), &msg).await.text().await.unwrap();
    assert!(!text.contains("[DONE]"));
    sim.stop().await;

    let sim = start("fault_reset=1").await;
    let resp = post(&format!("{}/v1/chat/completions", sim.url()), &msg).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.is_err(), "a reset must surface as a body error");
    sim.stop().await;

    // Damage lands inside what is actually streamed: tool calls (mostly swallowed markup tokens)
    // and replies cut short by max_tokens.
    let sim = start("fault_reset=1").await;
    let tool_stream = json!({"model": "sim-model", "stream": true, "tools": weather_tools(),
        "messages": [{"role": "user", "content": "x"}]});
    let cut_short = json!({"model": "sim-model", "stream": true, "max_tokens": 3, "sim": {"output_tokens": "fixed:200"},
        "messages": [{"role": "user", "content": "x"}]});
    for body in [&tool_stream, &cut_short] {
        for route in ["/v1/chat/completions", "/api/chat"] {
            let resp = post(&format!("{}{route}", sim.url()), body).await;
            assert!(resp.text().await.is_err(), "{route} {body}");
        }
    }
    sim.stop().await;

    let sim = start("fault_malformed=1").await;
    let text = post(&format!("{}/v1/chat/completions", sim.url()), &msg).await.text().await.unwrap();
    let bad = text
        .split("\n\n")
        .filter_map(|b| b.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter(|d| serde_json::from_str::<Value>(d).is_err())
        .count();
    assert_eq!(bad, 1, "{text}");
    sim.stop().await;

    let sim = start("fault_503=1").await;
    let resp = post(
        &format!("{}/v1/messages", sim.url()),
        &json!({"model": "sim-model", "max_tokens": 10, "stream": true, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let events = sse_events(&resp.text().await.unwrap());
    assert_eq!(events.last().unwrap().0.as_deref(), Some("error"));
    assert!(events.last().unwrap().1.contains("overloaded_error"));
    sim.stop().await;
}

#[tokio::test]
async fn tokenize_counts_what_a_chat_request_with_the_same_messages_is_charged() {
    let sim = start("max_model_len=4096&output_tokens=fixed:3").await;
    let messages = json!([
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is the weather in Paris today, and tomorrow?"},
    ]);
    let chat = json_of(
        post(
            &format!("{}/v1/chat/completions", sim.url()),
            &json!({"model": "m", "messages": messages, "tools": weather_tools()}),
        )
        .await,
    )
    .await;
    let charged = chat["usage"]["prompt_tokens"].as_u64().unwrap();
    // vLLM's TokenizeChatRequest and TokenizeResponse.
    let resp = post(
        &format!("{}/tokenize", sim.url()),
        &json!({"model": "m", "messages": messages, "tools": weather_tools(), "add_generation_prompt": true}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let counted = json_of(resp).await;
    assert_eq!(counted["count"].as_u64(), Some(charged));
    assert_eq!(counted["tokens"].as_array().unwrap().len() as u64, charged);
    assert_eq!(counted["max_model_len"], 4096);
    assert_eq!(counted["token_strs"], Value::Null);
    // Without the generation prompt, the open assistant turn is not counted.
    let without = json_of(
        post(
            &format!("{}/tokenize", sim.url()),
            &json!({"model": "m", "messages": messages, "tools": weather_tools(), "add_generation_prompt": false}),
        )
        .await,
    )
    .await;
    assert!(without["count"].as_u64().unwrap() < charged);
    // A TokenizeCompletionRequest: the prompt as it is, with the pieces when asked.
    let plain = json_of(
        post(
            &format!("{}/tokenize", sim.url()),
            &json!({"model": "m", "prompt": "hello world", "return_token_strs": true}),
        )
        .await,
    )
    .await;
    let pieces: Vec<&str> = plain["token_strs"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert_eq!(pieces.concat(), "hello world");
    assert_eq!(plain["count"].as_u64().unwrap() as usize, pieces.len());
    let bad = post(&format!("{}/tokenize", sim.url()), &json!({"model": "m"})).await;
    assert_eq!(bad.status(), 400);
    // Not a model call: the request counters do not move.
    assert_eq!(sim.stats()["requests"]["total"], 1);
}
