//! OpenAI-shaped HTTP errors: `{"error": {"message", "type", "param", "code"}}` with its status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// One error a request gets back; none of them stops the server.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), kind, param: None, code: None }
    }

    /// 400: malformed JSON or a bad value; `param` names the field when there is one.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the request field at fault.
    pub fn field(param: &str, message: impl Into<String>) -> ApiError {
        ApiError { param: Some(param.to_string()), ..ApiError::bad_request(message) }
    }

    /// 400 with OpenAI's `context_length_exceeded` code.
    pub fn context_length(param: &str, message: impl Into<String>) -> ApiError {
        ApiError { code: Some("context_length_exceeded"), ..ApiError::field(param, message) }
    }

    pub fn unauthorized() -> ApiError {
        let msg = "missing or wrong API key: send `Authorization: Bearer KEY` with the server's --api-key";
        ApiError { code: Some("invalid_api_key"), ..ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", msg) }
    }

    pub fn model_not_found(requested: &str, served: &str) -> ApiError {
        let msg = format!("the model `{requested}` does not exist; this server serves `{served}` (GET /v1/models)");
        ApiError { param: Some("model".into()), code: Some("model_not_found"), ..ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", msg) }
    }

    pub fn route_not_found(method: &str, path: &str) -> ApiError {
        let msg = format!("no route {method} {path} (POST /v1/chat/completions, POST /v1/completions, GET /v1/models, POST /tokenize, POST /detokenize, GET /health, GET /metrics)");
        ApiError { code: Some("not_found"), ..ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", msg) }
    }

    pub fn method_not_allowed(method: &str, path: &str) -> ApiError {
        let msg = format!("{path} does not take {method}");
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", msg)
    }

    pub fn too_large(limit: usize) -> ApiError {
        let msg = format!("the request body is over the server's limit of {limit} bytes (--body-limit)");
        ApiError { code: Some("request_too_large"), ..ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", msg) }
    }

    /// 503: every queue place is taken (`--queue`), the model is still loading, or the server stops.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { code: Some(code), ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message) }
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError { code: Some("internal_error"), ..ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message) }
    }

    /// The JSON body, also sent as an SSE event when a stream fails after its headers went out.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code }
        })
    }
}

/// Seconds a client told 503 waits before it tries again (`Retry-After`): the queue moves on at
/// each finished answer and a load ends in seconds, so one second is the honest order of magnitude;
/// the OpenAI SDK honours the header rather than its own backoff.
const RETRY_AFTER_SECS: &str = "1";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static(RETRY_AFTER_SECS));
        }
        r
    }
}
