//! Jobs through the real server: SSE, cancellation, the bounded queue, panics, client
//! disconnects and graceful shutdown. Test doubles wrap the real pipeline of the bundled
//! tiny model only to make jobs slow (or panic) on demand.

mod service_support;

use std::time::Duration;

use serde_json::{json, Value};
use service_support::{error_body, test_settings, tiny_request, Double, TestServer};

const SLOW: Double = Double::SlowSteps(Duration::from_millis(250));

fn long_request(prompt: &str, steps: u32) -> Value {
    let mut body = tiny_request(prompt);
    body["steps"] = json!(steps);
    body
}

/// Reads an SSE stream to its end; returns (event, data) pairs.
async fn read_events(response: reqwest::Response) -> Vec<(String, Value)> {
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let text = tokio::time::timeout(Duration::from_secs(120), response.text())
        .await
        .expect("the stream ends after the final event")
        .unwrap();
    text.split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event:") {
                    name = Some(value.trim().to_string());
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push_str(value.trim());
                }
            }
            Some((name?, serde_json::from_str(&data).unwrap_or(Value::Null)))
        })
        .collect()
}

#[tokio::test]
async fn sse_shows_queued_started_progress_succeeded() {
    let server = TestServer::start(test_settings(), SLOW).await;
    let blocker = server.submit(&long_request("first", 3)).await;
    server.wait_for(&blocker, Duration::from_secs(60), |job| job["state"] == "running").await;

    let response = server.post_json("/v1/jobs", &long_request("second", 2)).await;
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let accepted: Value = response.json().await.unwrap();
    assert_eq!(
        (accepted["state"].as_str(), accepted["queue_position"].as_u64()),
        (Some("queued"), Some(0))
    );
    let id = accepted["id"].as_str().unwrap();
    assert_eq!(location, format!("/v1/jobs/{id}"));

    let events = read_events(server.get(&format!("/v1/jobs/{id}/events")).await).await;
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names.first(), Some(&"queued"), "{names:?}");
    let started = names.iter().position(|n| *n == "started").expect("a started event");
    assert!(names[..started].iter().all(|n| *n == "queued"), "{names:?}");
    let progress: Vec<&Value> =
        events.iter().filter(|(n, _)| n == "progress").map(|(_, d)| d).collect();
    assert_eq!(progress.len(), 2, "{names:?}");
    assert_eq!((progress[1]["step"].as_u64(), progress[1]["steps"].as_u64()), (Some(2), Some(2)));
    assert_eq!(names.last(), Some(&"succeeded"), "{names:?}");
    assert!(events.last().unwrap().1["images"][0]["data"].is_string());

    let job = server.job(id).await;
    assert_eq!(job["state"], "succeeded");
    assert!(job["result"]["images"].is_array() && job["error"].is_null());
    for field in ["created_at", "started_at", "finished_at"] {
        assert!(job[field].is_string(), "{field}: {job}");
    }
    // A late subscriber gets the final event at once.
    let late = read_events(server.get(&format!("/v1/jobs/{id}/events")).await).await;
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].0, "succeeded");
    server.stop().await;
}

#[tokio::test]
async fn cancelling_stops_a_running_job_within_one_step_and_a_queued_one_at_once() {
    let server = TestServer::start(test_settings(), SLOW).await;
    let running = server.submit(&long_request("long", 40)).await;
    let queued = server.submit(&tiny_request("waiting")).await;
    let job = server
        .wait_for(&running, Duration::from_secs(60), |job| {
            job["progress"]["step"].as_u64() >= Some(1)
        })
        .await;
    assert_eq!(job["progress"]["steps"], 40);

    let response = server.delete(&format!("/v1/jobs/{queued}")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["state"], "cancelled");

    let response = server.delete(&format!("/v1/jobs/{running}")).await;
    assert_eq!(response.status(), 202);
    let at_cancel = response.json::<Value>().await.unwrap()["progress"]["step"].as_u64().unwrap();
    let job = server.wait_finished(&running).await;
    assert_eq!(job["state"], "cancelled", "{job}");
    let final_step = job["progress"]["step"].as_u64().unwrap();
    assert!(final_step <= at_cancel + 1, "stopped at step {final_step}, cancelled at {at_cancel}");
    assert_eq!(job["error"]["code"], "job_cancelled");
    error_body(server.delete(&format!("/v1/jobs/{running}")).await, 409).await;
    server.stop().await;
}

#[tokio::test]
async fn a_full_queue_answers_429_and_loses_no_accepted_job() {
    const CAPACITY: usize = 2;
    let mut settings = test_settings();
    settings.queue_capacity = CAPACITY;
    let server = TestServer::start(settings, Double::SlowSteps(Duration::from_millis(100))).await;
    let mut accepted = vec![server.submit(&long_request("running", 4)).await];
    server.wait_for(&accepted[0], Duration::from_secs(60), |job| job["state"] == "running").await;
    for i in 0..CAPACITY {
        accepted.push(server.submit(&tiny_request(&format!("waiting {i}"))).await);
    }
    // Request k+2: one running, k waiting.
    let response = server.post_json("/v1/jobs", &tiny_request("one too many")).await;
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    assert_eq!(error_body(response, 429).await["code"], "queue_full");
    for id in &accepted {
        assert_eq!(server.wait_finished(id).await["state"], "succeeded");
    }
    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("sdserve_jobs_total{state=\"rejected\"} 1"), "{metrics}");
    server.stop().await;
}

#[tokio::test]
async fn priority_jumps_the_queue() {
    let server = TestServer::start(test_settings(), SLOW).await;
    let blocker = server.submit(&long_request("first", 3)).await;
    server.wait_for(&blocker, Duration::from_secs(60), |job| job["state"] == "running").await;
    let normal = server.submit(&tiny_request("normal")).await;
    let mut urgent_body = tiny_request("urgent");
    urgent_body["priority"] = json!(10);
    let urgent = server.submit(&urgent_body).await;
    assert_eq!(server.job(&urgent).await["queue_position"], 0);
    assert_eq!(server.job(&normal).await["queue_position"], 1);
    let urgent_job = server.wait_finished(&urgent).await;
    let normal_job = server.wait_finished(&normal).await;
    assert!(urgent_job["started_at"].as_str() <= normal_job["started_at"].as_str());
    server.stop().await;
}

#[tokio::test]
async fn a_panicking_job_fails_and_the_worker_goes_on() {
    let server = TestServer::start(test_settings(), Double::PanicsOnPrompt).await;
    let error =
        error_body(server.post_json("/v1/generate", &tiny_request("PANIC now")).await, 500).await;
    assert_eq!(error["type"], "server_error");
    let response = server.post_json("/v1/generate", &tiny_request("calm")).await;
    assert_eq!(response.status(), 200);
    let ready: Value = server.get("/ready").await.json().await.unwrap();
    assert_eq!(ready["status"], "ready");
    server.stop().await;
}

#[tokio::test]
async fn a_sync_client_that_disconnects_cancels_its_job() {
    let server = TestServer::start(test_settings(), SLOW).await;
    let impatient = server
        .client
        .post(server.url("/v1/generate"))
        .json(&long_request("slow", 40))
        .timeout(Duration::from_millis(800))
        .send()
        .await;
    assert!(impatient.is_err(), "the client gave up");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = server.get("/metrics").await.text().await.unwrap();
        if metrics.contains("sdserve_jobs_total{state=\"cancelled\"} 1") {
            assert!(metrics.contains("sdserve_jobs_running 0"), "{metrics}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "job not cancelled:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn shutdown_refuses_new_work_and_finishes_jobs_in_flight() {
    let server =
        TestServer::start(test_settings(), Double::SlowSteps(Duration::from_millis(150))).await;
    let running = server.submit(&long_request("running", 4)).await;
    let queued = server.submit(&long_request("queued", 2)).await;
    server.wait_for(&running, Duration::from_secs(60), |job| job["state"] == "running").await;

    // Streams opened before the shutdown stay open until their jobs finish.
    let running_events = server.get(&format!("/v1/jobs/{running}/events")).await;
    let queued_events = server.get(&format!("/v1/jobs/{queued}/events")).await;

    server.server.shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let error = error_body(server.post_json("/v1/jobs", &tiny_request("late")).await, 503).await;
    assert_eq!(error["code"], "shutting_down");
    assert_eq!(server.get("/ready").await.status(), 503);

    for events in [running_events, queued_events] {
        let events = read_events(events).await;
        assert_eq!(events.last().map(|(name, _)| name.as_str()), Some("succeeded"), "{events:?}");
    }
    tokio::time::timeout(Duration::from_secs(60), server.server.wait())
        .await
        .expect("the server exits after draining")
        .expect("and exits cleanly");
}
