//! The MCP server: the tools `spectral.list_actions` and `spectral.decide`, served over
//! Streamable HTTP at `/mcp` (wired in by `http`) and over stdio by `spectral mcp`.
//!
//! **Boundary:** with `http`, the only module that names `rmcp` types. It knows what the tools
//! run against only through [`Backend`]: the service (over HTTP, in `http`) or a world folder
//! ([`Folder`], offline). **Invariant:** a tool answers what the HTTP API answers for the same
//! input: a decision, or the problem document of the error, returned as a tool error so the
//! model sees its `code` and `detail`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ClientJsonRpcMessage, ContentBlock,
    Implementation, JsonObject, ListToolsResult, PaginatedRequestParams, ServerCapabilities,
    ServerConfig, ServerJsonRpcMessage, Tool, ToolAnnotations,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::{
    LocalSessionManager, LocalSessionManagerError,
};
use rmcp::transport::streamable_http_server::session::{
    EventStore, ServerSseMessage, SessionId, SessionManager,
};
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::sandbox::Sandbox;
use crate::service::openapi;
use crate::service::DecideInput;
use crate::worlds::context::SystemValues;
use crate::worlds::{self, CompiledWorld};

pub(crate) const LIST_ACTIONS: &str = "spectral.list_actions";
pub(crate) const DECIDE: &str = "spectral.decide";

const INSTRUCTIONS: &str = "Spectral decides whether an action may proceed before you take it. \
Call spectral.list_actions to learn the actions of your world and the evidence each one reads, \
then call spectral.decide with the action and that evidence before acting. The answer is \
binding: its status and work frame say what you may do next.";

const DECIDE_DESCRIPTION: &str = "Ask whether an action may proceed, before taking it. Send the \
action and its context (the evidence listed by spectral.list_actions). The answer is binding. \
status GREEN: proceed with the action. GREEN-SKIP: the action is not needed; skip it. YELLOW: do \
not proceed; do work_frame.next_action instead (request_review, or gather_evidence_and_retry when \
work_frame.missing_evidence names attributes to find and send again). RED: do not proceed. \
Whatever the status, never take an action in work_frame.forbidden_actions, take only actions in \
work_frame.allowed_actions, produce every item of work_frame.required_output, and hand over to \
work_frame.next_human_owner when it is set. Every decision is recorded with its decision_id. \
On an error the result is a problem document (status, code, detail) as the HTTP API returns it.";

const LIST_ACTIONS_DESCRIPTION: &str =
    "List the actions you can ask spectral.decide about, in the \
deployed version of your world, each with the JSON Schema of the context (evidence) its rules \
read. Send every attribute named in the schema's x-spectral-required-evidence: a decision without \
one is YELLOW with gather_evidence_and_retry. An operator key must name the world.";

/// A tool call that produced no result: the problem the HTTP API would have answered with.
#[derive(Debug, Clone)]
pub struct Fault {
    /// The HTTP status of the problem.
    pub status: u16,
    /// The RFC 9457 problem document (`type`, `title`, `status`, `detail`, `code`).
    pub document: Value,
}

impl Fault {
    /// A problem document in the service's shape, for backends that have no HTTP layer.
    pub fn new(status: u16, code: &str, detail: impl Into<String>) -> Self {
        let title = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Error");
        Self {
            status,
            document: json!({
                "type": format!("/problems/{code}"),
                "title": title,
                "status": status,
                "detail": detail.into(),
                "code": code,
            }),
        }
    }
}

/// What the tools run against.
pub trait Backend: Send + Sync + 'static {
    /// Who is asking, as the transport established it (an authenticated key over HTTP).
    type Caller: Clone + Send + Sync + 'static;

    /// The deployed actions of the caller's world (`world` names it for an operator key), as
    /// [`openapi::catalog`] describes them.
    fn list_actions(
        &self,
        caller: Option<Self::Caller>,
        world: Option<String>,
    ) -> impl Future<Output = Result<Value, Fault>> + Send;

    /// Decide a request given as the JSON text of a `POST /api/decide` body.
    fn decide(
        &self,
        caller: Option<Self::Caller>,
        request: String,
    ) -> impl Future<Output = Result<Value, Fault>> + Send;
}

fn object(value: Value) -> Arc<JsonObject> {
    match value {
        Value::Object(map) => Arc::new(map),
        _ => Arc::new(JsonObject::new()),
    }
}

/// The two tools, with their input and output schemas.
pub fn tools() -> Vec<Tool> {
    let mut read_only = ToolAnnotations::default();
    read_only.read_only_hint = Some(true);
    read_only.open_world_hint = Some(false);
    let mut decide = ToolAnnotations::default();
    // A decision is recorded, but it changes nothing the caller acts on.
    decide.read_only_hint = Some(false);
    decide.destructive_hint = Some(false);
    decide.idempotent_hint = Some(true);
    decide.open_world_hint = Some(false);
    vec![
        Tool::new(
            DECIDE,
            DECIDE_DESCRIPTION,
            object(openapi::decide_request_schema(false)),
        )
        .with_title("Decide whether an action may proceed")
        .with_raw_output_schema(object(openapi::decision_schema()))
        .with_annotations(decide),
        Tool::new(
            LIST_ACTIONS,
            LIST_ACTIONS_DESCRIPTION,
            object(json!({
                "type": "object",
                "properties": {"world": {"type": "string", "description": "The world; only an operator key needs to name it."}},
                "additionalProperties": false
            })),
        )
        .with_title("List the actions and the evidence they read")
        .with_raw_output_schema(object(openapi::catalog_schema()))
        .with_annotations(read_only),
    ]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListActionsInput {
    #[serde(default)]
    world: Option<String>,
}

/// The MCP server handler over a backend.
pub struct Server<B> {
    backend: Arc<B>,
}

impl<B> Clone for Server<B> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
        }
    }
}

impl<B: Backend> Server<B> {
    pub fn new(backend: Arc<B>) -> Self {
        Self { backend }
    }

    async fn run(
        &self,
        name: &str,
        caller: Option<B::Caller>,
        arguments: JsonObject,
    ) -> Result<Result<Value, Fault>, ErrorData> {
        match name {
            DECIDE => {
                let text = Value::Object(arguments).to_string();
                Ok(self.backend.decide(caller, text).await)
            }
            LIST_ACTIONS => {
                match serde_json::from_value::<ListActionsInput>(Value::Object(arguments)) {
                    Ok(input) => Ok(self.backend.list_actions(caller, input.world).await),
                    Err(e) => Ok(Err(Fault::new(
                        400,
                        "malformed_request",
                        format!("the arguments are not valid: {e}"),
                    ))),
                }
            }
            other => Err(ErrorData::invalid_params(
                format!("unknown tool '{other}'; this server has {DECIDE} and {LIST_ACTIONS}"),
                None,
            )),
        }
    }
}

impl<B: Backend> ServerHandler for Server<B> {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("spectral", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tools()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        tools().into_iter().find(|t| t.name == name)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        // Over HTTP, `http` put the authenticated caller into the request's extensions.
        let caller = context
            .extensions
            .get::<http::request::Parts>()
            .and_then(|parts| parts.extensions.get::<B::Caller>())
            .cloned();
        let arguments = request.arguments.unwrap_or_default();
        let result = match self.run(&request.name, caller, arguments).await? {
            Ok(value) => CallToolResult::structured(value),
            Err(fault) => {
                let code = fault.document["code"]
                    .as_str()
                    .unwrap_or("error")
                    .to_string();
                let detail = fault.document["detail"].as_str().unwrap_or("").to_string();
                let mut result = CallToolResult::structured_error(fault.document);
                result.content = vec![ContentBlock::text(format!(
                    "{} {code}: {detail}",
                    fault.status
                ))];
                result
            }
        };
        Ok(result.into())
    }
}

/// Bounds on the Streamable HTTP sessions of the earlier protocol revisions (the current one
/// has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SessionLimits {
    /// Sessions open at once; an `initialize` beyond them is refused.
    pub max_sessions: usize,
    /// A session is closed this long after it began, however busy.
    pub max_age: Duration,
    /// A session is closed after this long without a request.
    pub idle: Duration,
}

/// Why a session could not be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionsError {
    #[error("the server has its maximum of {0} MCP sessions open")]
    Full(usize),
    #[error(transparent)]
    Local(#[from] LocalSessionManagerError),
}

struct Entry {
    born: Instant,
    owner: Option<String>,
}

/// The in-memory session manager of rmcp with a bound on the number of sessions and on their
/// age, and the key each one belongs to.
pub(crate) struct Sessions {
    inner: LocalSessionManager,
    limits: SessionLimits,
    book: Mutex<HashMap<SessionId, Entry>>,
}

impl Sessions {
    pub fn new(limits: SessionLimits) -> Self {
        let mut inner = LocalSessionManager::default();
        inner.session_config.keep_alive = Some(limits.idle);
        Self {
            inner,
            limits,
            book: Mutex::new(HashMap::new()),
        }
    }

    fn book(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Entry>> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Close sessions past their age and forget those rmcp closed for idleness.
    async fn sweep(&self) {
        let now = Instant::now();
        let known: Vec<(SessionId, bool)> = self
            .book()
            .iter()
            .map(|(id, e)| {
                (
                    id.clone(),
                    now.duration_since(e.born) >= self.limits.max_age,
                )
            })
            .collect();
        for (id, old) in known {
            let alive = self.inner.sessions.read().await.contains_key(&id);
            if old || !alive {
                if alive {
                    let _ = self.inner.close_session(&id).await;
                }
                self.book().remove(&id);
            }
        }
    }

    /// Whether a new session would be refused.
    pub async fn full(&self) -> bool {
        self.sweep().await;
        self.book().len() >= self.limits.max_sessions
    }

    pub fn limits(&self) -> SessionLimits {
        self.limits
    }

    /// Record the key a session was opened with.
    pub(crate) fn set_owner(&self, id: &str, owner: &str) {
        if let Some(e) = self.book().get_mut(id) {
            e.owner = Some(owner.to_string());
        }
    }

    /// The key a session was opened with, if the session is known.
    pub fn owner(&self, id: &str) -> Option<String> {
        self.book().get(id).and_then(|e| e.owner.clone())
    }
}

impl SessionManager for Sessions {
    type Error = SessionsError;
    type Transport = <LocalSessionManager as SessionManager>::Transport;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        if self.full().await {
            return Err(SessionsError::Full(self.limits.max_sessions));
        }
        let (id, transport) = self.inner.create_session().await?;
        self.book().insert(
            id.clone(),
            Entry {
                born: Instant::now(),
                owner: None,
            },
        );
        Ok((id, transport))
    }

    async fn initialize_session(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<ServerJsonRpcMessage, Self::Error> {
        Ok(self.inner.initialize_session(id, message).await?)
    }

    async fn has_session(&self, id: &SessionId) -> Result<bool, Self::Error> {
        let expired = self
            .book()
            .get(id)
            .map(|e| e.born.elapsed() >= self.limits.max_age);
        match expired {
            None => Ok(false),
            Some(true) => {
                let _ = self.inner.close_session(id).await;
                self.book().remove(id);
                Ok(false)
            }
            Some(false) => Ok(self.inner.has_session(id).await?),
        }
    }

    async fn close_session(&self, id: &SessionId) -> Result<(), Self::Error> {
        self.book().remove(id);
        Ok(self.inner.close_session(id).await?)
    }

    async fn create_stream(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        Ok(self.inner.create_stream(id, message).await?)
    }

    async fn accept_message(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<(), Self::Error> {
        Ok(self.inner.accept_message(id, message).await?)
    }

    async fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        Ok(self.inner.create_standalone_stream(id).await?)
    }

    async fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        Ok(self.inner.resume(id, last_event_id).await?)
    }

    fn event_store(&self) -> Option<Arc<dyn EventStore>> {
        self.inner.event_store()
    }
}

/// The Streamable HTTP service of a backend. `http` checks Origin, the key, the body and the
/// session bound before a request reaches it; Host is not restricted here because the service
/// runs behind public names, and a browser page cannot present a key.
pub(crate) type HttpService<B> = StreamableHttpService<Server<B>, Sessions>;

pub(crate) fn http_service<B: Backend>(
    backend: Arc<B>,
    sessions: Arc<Sessions>,
    max_body_bytes: usize,
    stop: tokio_util::sync::CancellationToken,
) -> HttpService<B> {
    let config = StreamableHttpServerConfig::default()
        .disable_allowed_hosts()
        .disable_allowed_origins()
        .with_max_request_body_bytes(max_body_bytes)
        .with_json_response(true)
        .with_cancellation_token(stop);
    StreamableHttpService::new(move || Ok(Server::new(backend.clone())), sessions, config)
}

/// The tools offline, against a world folder, as `spectral decide` decides: no store, no
/// keys, no decision records.
pub(crate) struct Folder {
    world: CompiledWorld,
    sandbox: Sandbox,
}

impl Folder {
    pub fn new(world: CompiledWorld, sandbox: Sandbox) -> Self {
        Self { world, sandbox }
    }

    fn check_world(&self, named: Option<&str>) -> Result<(), Fault> {
        match named {
            Some(w) if w != self.world.model.world => Err(Fault::new(
                404,
                "not_found",
                format!(
                    "this server serves world '{}', not '{w}'",
                    self.world.model.world
                ),
            )),
            _ => Ok(()),
        }
    }

    fn decide_now(&self, text: &str) -> Result<Value, Fault> {
        let input: DecideInput = serde_json::from_str(text).map_err(|e| {
            Fault::new(
                400,
                "malformed_request",
                format!("the request body is not valid: {e}"),
            )
        })?;
        self.check_world(input.world.as_deref())?;
        if let Some(v) = input.world_model_version {
            if v != self.world.version {
                return Err(Fault::new(
                    404,
                    "not_found",
                    format!(
                        "world '{}' has no version {v} here; the folder is version {}",
                        self.world.model.world, self.world.version
                    ),
                ));
            }
        }
        let module = self.world.module(&input.action).ok_or_else(|| {
            Fault::new(
                404,
                "not_found",
                format!(
                    "world '{}' version {} has no action '{}'",
                    self.world.model.world, self.world.version, input.action
                ),
            )
        })?;
        let request = worlds::Request {
            context: worlds::ContextJson::Text(input.context.get()),
            system: SystemValues {
                request_time: chrono::Utc::now().timestamp(),
                request_id: uuid::Uuid::now_v7().to_string(),
                caller: "mcp-stdio".into(),
            },
            correlation_id: input.correlation_id.clone(),
            explain: input.explain,
        };
        let decision = worlds::evaluate(&self.sandbox, module, &request)
            .map_err(|e| Fault::new(400, "bad_request", e.to_string()))?;
        serde_json::to_value(&decision)
            .map_err(|e| Fault::new(500, "internal", format!("decision does not serialize: {e}")))
    }
}

impl Backend for Folder {
    type Caller = ();

    async fn list_actions(
        &self,
        _caller: Option<()>,
        world: Option<String>,
    ) -> Result<Value, Fault> {
        self.check_world(world.as_deref())?;
        Ok(openapi::catalog(&self.world.model, self.world.version))
    }

    async fn decide(&self, _caller: Option<()>, request: String) -> Result<Value, Fault> {
        self.decide_now(&request)
    }
}

/// Serve the tools of a world folder on stdin and stdout until the client closes them.
pub(crate) async fn serve_stdio(folder: Folder) -> Result<(), std::io::Error> {
    let server = Server::new(Arc::new(folder));
    let running = server
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    running
        .waiting()
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(())
}
