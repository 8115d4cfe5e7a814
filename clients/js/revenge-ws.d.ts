// Types of revenge-ws.js, the JavaScript client of the revenge.v1 hub.

export declare const VERSION: string;
export declare const SUBPROTOCOL: "revenge.v1";

export declare const CloseCode: Readonly<{
  NORMAL: 1000;
  GOING_AWAY: 1001;
  UNSUPPORTED_DATA: 1003;
  ABNORMAL: 1006;
  POLICY: 1008;
  TOO_BIG: 1009;
  INTERNAL_ERROR: 1011;
  SERVICE_RESTART: 1012;
  TOKEN_EXPIRED: 4001;
  SLOW_CONSUMER: 4002;
  HEARTBEAT_TIMEOUT: 4003;
  RATE_LIMITED: 4004;
  UNAUTHORIZED: 4501;
  DISCONNECTED: 4503;
}>;

export type ErrorCodeName =
  | "INVALID_JSON"
  | "INVALID_MESSAGE"
  | "UNKNOWN_TYPE"
  | "UNAUTHORIZED"
  | "FORBIDDEN"
  | "NOT_FOUND"
  | "CONFLICT"
  | "RATE_LIMITED"
  | "TOO_LARGE"
  | "TOKEN_EXPIRED"
  | "UNAVAILABLE"
  | "INTERNAL"
  | "TIMEOUT"
  | "REJECTED";

export declare const ErrorCode: Readonly<{ [K in ErrorCodeName]: K }>;

/** Whether to reconnect after this close code (contract §4); null = network loss. */
export declare function shouldReconnect(code: number | null | undefined): boolean;

// ---------------------------------------------------------------- errors

export declare class RevengeError extends Error {
  code: string | number | null;
}
export declare class RequestError extends RevengeError {
  code: ErrorCodeName | string;
  retryable: boolean;
  requestId: string | null;
  /** The request type that failed. */
  type: string | null;
  constructor(
    code: string,
    message: string,
    extra?: { retryable?: boolean; requestId?: string | null; type?: string | null },
  );
}
export declare class SubscribeError extends RequestError {
  errors: { channel: string; code: string; message?: string }[];
  subscriptions: SubscriptionEntry[];
}
export declare class RequestTimeout extends RevengeError {
  code: "TIMEOUT";
}
export declare class ConnectionClosed extends RevengeError {
  /** The close code, or null (network loss, no close frame). */
  code: number | null;
  reason: string;
  constructor(code: number | null, reason?: string);
}

// ---------------------------------------------------------------- backoff

export interface ReconnectPolicy {
  backoffMin: number;
  backoffMax: number;
  restartWindow: number;
  rateLimitWait: number;
  maxWindow: number;
  /** After 4004 / 429, the attempt is spread uniformly over this many seconds beyond rateLimitWait. */
  rateLimitSpread: number;
}
export declare const DEFAULT_POLICY: Readonly<ReconnectPolicy>;
export declare function backoffDelay(
  attempt: number,
  rng?: () => number,
  minimum?: number,
  maximum?: number,
): number;
export declare function restartDelay(window: number, rng?: () => number): number;
/** The spread window a close reason advises (`"slow consumer; window=5"`), in seconds. */
export declare function advisedWindow(reason: string | null | undefined, maximum?: number): number | null;
export declare function reconnectDelay(
  policy: ReconnectPolicy,
  attempt: number,
  rng?: () => number,
  info?: {
    code?: number | null;
    httpStatus?: number | null;
    retryAfter?: number | null;
    /** A spread window the server advised: close reason, welcome, or Reconnect-Window. */
    window?: number | null;
  },
): number;

// ---------------------------------------------------------------- presence

export interface PresenceUser {
  user_id: string;
  /** The token's `name`, else the user id. */
  name: string;
}
/** The data of `activity.presence`: net changes since the previous one. */
export interface PresenceData {
  online: PresenceUser[];
  offline: PresenceUser[];
  /** Present when the hub named only some users (a large batch): how many it left out. */
  more?: { online: number; offline: number };
}
export declare function parsePresence(msg: unknown): PresenceData | null;
/** Who is online, from the `activity.presence` messages seen since it was created. */
export declare class OnlineUsers {
  constructor();
  /** user_id -> name, in the order they came online. */
  readonly users: Map<string, string>;
  readonly size: number;
  /** Apply one message (others are ignored); returns the change it carried, or null. */
  apply(msg: unknown): PresenceData | null;
  has(userId: string): boolean;
  clear(): void;
}

// ---------------------------------------------------------------- clock

export declare class ClockSample {
  readonly t0: number;
  readonly t1: number;
  readonly t2: number;
  readonly t3: number;
  constructor(t0: number, t1: number, t2: number, t3: number);
  /** Server clock minus client clock (ms). */
  readonly offset: number;
  /** Round-trip delay, server time excluded (ms). */
  readonly delay: number;
}
export declare class ClockSync {
  readonly size: number;
  constructor(size?: number);
  add(t0: number, t1: number, t2: number, t3: number): ClockSample | null;
  reset(): void;
  readonly samples: ClockSample[];
  readonly best: ClockSample | null;
  readonly latest: ClockSample | null;
  readonly offset: number | null;
  readonly delay: number | null;
  serverTime(localMs: number): number;
}

// ---------------------------------------------------------------- tracker

export type VerdictName = "deliver" | "duplicate" | "held" | "gap" | "deliver_and_recover" | "ignored";
export declare const Verdict: Readonly<{
  DELIVER: "deliver";
  DUPLICATE: "duplicate";
  HELD: "held";
  GAP: "gap";
  DELIVER_AND_RECOVER: "deliver_and_recover";
  IGNORED: "ignored";
}>;
export declare function latestOnly(channel: string): boolean;

export interface StreamPosition {
  epoch: string;
  seq: number;
}

export declare class Tracker {
  constructor(notificationIds?: number);
  readonly channels: Map<string, { name: string; epoch: string | null; seq: number | null; automatic: boolean; recovering: boolean }>;
  want(name: string, since?: StreamPosition | null): unknown;
  drop(name: string): void;
  forget(name: string): void;
  positions(): Record<string, StreamPosition>;
  itemsFor(names: Iterable<string>): (string | { name: string; since: StreamPosition })[];
  onWelcome(entries: Iterable<Record<string, any>>, generation: number): (string | { name: string; since: StreamPosition })[];
  applyEntry(entry: Record<string, any>, generation: number): boolean;
  cancel(names: Iterable<string>): void;
  onReset(name: string, epoch: string, seq: number): void;
  onAdded(entry: Record<string, any>, generation: number): boolean;
  onPublication(name: string, epoch: string, seq: number): VerdictName;
  onNotification(message: Record<string, any>): VerdictName;
}

// ---------------------------------------------------------------- client

/** A server message as decoded from the wire. */
export interface Message<D = Record<string, any>> {
  type: string;
  id?: string;
  channel?: string;
  seq?: number;
  epoch?: string;
  timestamp?: string;
  data: D;
}

export interface SubscriptionEntry {
  channel: string;
  epoch: string;
  seq: number;
  recovered: boolean;
  missed: number;
  latest?: Message | null;
}

export interface Notification {
  id: string;
  notification_type: string;
  title: string;
  body?: string | null;
  priority: "critical" | "high" | "normal" | "low";
  content_id?: string | null;
  icon_url?: string | null;
  action_url?: string | null;
  created_at: string | number;
  read: boolean;
}

export interface Welcome {
  session_id: string;
  user_id: string;
  node_id: string;
  protocol: "revenge.v1";
  server_time: number;
  expires_at: number;
  heartbeat: { interval: number; timeout: number };
  subscriptions: { channel: string; epoch: string; seq: number }[];
  [key: string]: unknown;
}

export interface ClientEvent<D = Record<string, any>> {
  type:
    | "client.connected"
    | "client.disconnected"
    | "client.recovery_failed"
    | "client.subscription_error"
    | "client.closed"
    | "client.state"
    | "client.device";
  data: D;
}

export interface DisconnectedEvent {
  code: number | null;
  reason: string;
  http_status: number | null;
  /** Seconds until the next attempt; null when the client gave up. */
  reconnect_in: number | null;
  opened: boolean;
}

export interface Timers {
  /** Milliseconds since the Unix epoch (sub-ms precision welcome). */
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(id: unknown): void;
}

export interface Logger {
  debug?(...args: unknown[]): void;
  info?(...args: unknown[]): void;
  warn?(...args: unknown[]): void;
  error?(...args: unknown[]): void;
}

export interface ClientOptions {
  /** A JWT; sent as ?token= (browsers cannot set headers on a WebSocket). */
  token?: string | null;
  /** Returns a fresh token: used when there is none, before expiry (auth.refresh), after 4001 or 401. */
  tokenProvider?: (() => Promise<string>) | null;
  /** A channel's history could not be recovered: reload that state over REST. */
  onRecoveryFailed?: ((channel: string) => unknown) | null;
  /** WebSocket constructor (default globalThis.WebSocket). */
  WebSocket?: any;
  /** fetch, used to learn why a handshake failed (default globalThis.fetch). */
  fetch?: typeof globalThis.fetch | null;
  /** Random source in [0, 1) for the jitter. */
  random?: () => number;
  timers?: Partial<Timers>;
  logger?: Logger;
  requestTimeout?: number;
  connectTimeout?: number;
  backoffMin?: number;
  backoffMax?: number;
  restartWindow?: number;
  rateLimitWait?: number;
  maxWindow?: number;
  rateLimitSpread?: number;
  stableAfter?: number;
  refreshMargin?: number | null;
  initialPings?: number;
  initialPingInterval?: number;
  pingInterval?: number | null;
  watchdogTimeout?: number | null;
  clockSamples?: number;
  reconnect?: boolean;
  notificationIds?: number;
  /** After a failed handshake, fetch the URL to learn the HTTP status (401/403/429/503). */
  probeHandshake?: boolean;
  /** Use the browser's online/offline events (reconnect at once when back online). */
  watchNetwork?: boolean;
  /** Make this connection a device: `device.hello` after every (re)connect (§13). */
  device?: DeviceConfig | null;
  /** While playing, `reportPlayback` repeats the report this often (seconds, default 10). */
  playbackInterval?: number;
}

export declare const DEFAULT_OPTIONS: Readonly<Required<Omit<ClientOptions, "token" | "tokenProvider" | "onRecoveryFailed" | "WebSocket" | "fetch" | "random" | "timers" | "logger" | "device">>>;

export interface ClientStats {
  connects: number;
  attempts: number;
  disconnects: number;
  delivered: number;
  duplicates: number;
  held: number;
  gaps: number;
  recoveries: number;
  recoveryFailures: number;
  pings: number;
  watchdogFired: number;
  tokenRefreshes: number;
  invalidFrames: number;
}

export type ClientState = "idle" | "connecting" | "connected" | "waiting" | "closed";

export declare function tokenExpiry(token: string | null | undefined): number | null;
export declare function websocketUrl(url: string): string;

export declare class RevengeClient {
  constructor(url: string, options?: ClientOptions);
  readonly url: string;
  readonly options: ClientOptions;
  readonly policy: ReconnectPolicy;
  readonly stats: ClientStats;
  readonly clock: ClockSync;
  readonly logger: Logger;
  welcome: Welcome | null;
  lastClose: { code: number | null; reason: string } | null;

  /** Start and resolve with the welcome once connected (timeout in seconds). */
  connect(timeout?: number): Promise<Welcome>;
  start(): void;
  close(): Promise<void>;
  waitConnected(timeout?: number): Promise<Welcome>;
  waitClosed(): Promise<ConnectionClosed | null>;

  readonly state: ClientState;
  readonly connected: boolean;
  readonly error: ConnectionClosed | null;
  readonly sessionId: string | null;
  readonly userId: string | null;
  readonly clockOffset: number | null;
  /** Min-delay RTT (ms) of the last `clockSamples` pings (the sample `clockOffset` comes from). */
  readonly rtt: number | null;
  /** RTT (ms) of the latest ping, jitter included. */
  readonly rttLatest: number | null;
  readonly channels: string[];
  readonly token: string | null;
  serverTime(): number;
  positions(): Record<string, StreamPosition>;

  request<T = Record<string, any>>(type: string, data?: Record<string, any>, opts?: { timeout?: number }): Promise<T>;
  send(type: string, data?: Record<string, any>): boolean;
  subscribe(
    channels: string | string[],
    opts?: {
      since?: Record<string, StreamPosition>;
      handler?: (msg: Message) => unknown;
      timeout?: number;
    },
  ): Promise<SubscriptionEntry[]>;
  unsubscribe(channels: string | string[], opts?: { timeout?: number }): Promise<void>;
  ackNotifications(ids: string | string[]): Promise<Record<string, any>>;
  ping(opts?: { timeout?: number }): Promise<ClockSample | null>;
  reconnectNow(): void;
  dropConnection(reason?: string): void;

  on(key: "client.connected", handler: (ev: ClientEvent<Welcome>) => unknown): () => void;
  on(key: "client.disconnected", handler: (ev: ClientEvent<DisconnectedEvent>) => unknown): () => void;
  on(key: "client.state", handler: (ev: ClientEvent<{ state: ClientState }>) => unknown): () => void;
  on(
    key: "client.recovery_failed",
    handler: (ev: ClientEvent<{ channel: string; epoch: string; seq: number; reason: string; latest?: Message }>) => unknown,
  ): () => void;
  on(key: "notification", handler: (msg: Message<Notification>) => unknown): () => void;
  on(key: "client.device", handler: (ev: ClientEvent<DeviceEvent>) => unknown): () => void;
  on(key: "device.updated", handler: (msg: Message<{ device: Device }>) => unknown): () => void;
  on(key: "device.removed", handler: (msg: Message<{ device_id: string }>) => unknown): () => void;
  on(key: "sessions.updated", handler: (msg: Message<SessionsUpdated>) => unknown): () => void;
  on(key: string, handler: (msg: Message | ClientEvent) => unknown): () => void;
  off(key: string, handler: (msg: any) => unknown): void;
  once(key: string, handler: (msg: any) => unknown): () => void;

  // -- devices (§13)
  /** The hub's device object from the last acknowledged `device.hello`. */
  device: Device | null;
  /** The `device.hello` data this client sends, or null. */
  readonly deviceConfig: DeviceHello | null;
  /** Hello acknowledged on the current connection and not taken over since. */
  readonly deviceActive: boolean;
  /** Become a device (hello now when connected, and after every reconnect); null: stop at the next connect. */
  setDevice(config: DeviceConfig | null): Promise<Device | null>;
  /**
   * `playback.update`; repeated every `playbackInterval` s while playing (position
   * extrapolated) and after a reconnect. true: acknowledged; false: kept for later.
   */
  reportPlayback(report: PlaybackReport): Promise<boolean>;
  /** The last report, position extrapolated to now while playing; null when nothing plays. */
  currentPlayback(): PlaybackUpdate | null;
  /** Answer `remote.command`: the handler's object is the result's `state`, a throw is `ok: false`. */
  onCommand(handler: (cmd: RemoteCommand) => unknown): () => void;
  /** Rejects with RequestError: REJECTED, TIMEOUT, NOT_FOUND, FORBIDDEN, UNAVAILABLE, RATE_LIMITED, INVALID_MESSAGE. */
  sendCommand(
    deviceId: string,
    command: RemoteCommandName | string,
    args?: Record<string, any> | null,
    opts?: { userId?: string; timeoutMs?: number; timeout?: number },
  ): Promise<CommandResult>;
  listDevices(opts?: { userId?: string; all?: boolean; timeout?: number }): Promise<Device[]>;
}

// ---------------------------------------------------------------- devices

export type RemoteCommandName =
  | "play"
  | "pause"
  | "unpause"
  | "toggle_pause"
  | "stop"
  | "seek"
  | "next"
  | "previous"
  | "set_volume"
  | "mute"
  | "unmute"
  | "display_message";
/** The commands the hub validates; `x-…` names are a device's own. */
export declare const REMOTE_COMMANDS: readonly RemoteCommandName[];

export interface DeviceConfig {
  /** Stable per install (1-128 chars); default: a random id (not kept). */
  deviceId?: string;
  /** Shown to the user (1-100 chars). Default "Web browser". */
  name?: string;
  /** The app's name. Default "revenge-ws.js". */
  client?: string;
  version?: string;
  /** Commands this device obeys (`capabilities.commands`). */
  commands?: (RemoteCommandName | string)[];
  /** Default: true when `commands` is not empty. */
  remoteControl?: boolean;
}

export interface DeviceHello {
  device_id: string;
  name: string;
  client: string;
  version: string;
  capabilities: { remote_control: boolean; commands: string[] };
}

export type PlaybackState = "playing" | "paused" | "buffering" | "stopped";

/** `playback.update` data (wire names). */
export interface PlaybackUpdate {
  item_id: string;
  item_type?: string;
  title?: string;
  state: PlaybackState;
  /** Seconds. */
  position: number;
  duration?: number;
  rate?: number;
  volume?: number;
  muted?: boolean;
  play_method?: "direct" | "transcode";
  transcode_job_id?: string;
  room_id?: string;
}

/** A report: wire names, or camelCase aliases for the multi-word ones. */
export type PlaybackReport = Partial<PlaybackUpdate> & {
  state: PlaybackState;
  position: number;
  itemId?: string;
  itemType?: string;
  playMethod?: "direct" | "transcode";
  transcodeJobId?: string;
  roomId?: string;
};

export interface NowPlaying extends PlaybackUpdate {
  /** Server ms of the report. */
  updated_at: number;
}

export interface Device {
  device_id: string;
  user_id: string;
  name: string;
  client: string;
  version: string;
  capabilities: { remote_control: boolean; commands: string[] };
  connected_at: number;
  updated_at: number;
  now_playing: NowPlaying | null;
}

export interface SessionsUpdated {
  devices: Device[];
  removed: { user_id: string; device_id: string }[];
}

export interface RemoteCommand {
  command: RemoteCommandName | string;
  args: Record<string, any>;
  from: { user_id: string; device_id: string | null } | null;
  commandId: string;
  /** The `remote.command` message. */
  message: Message;
}

export interface CommandResult {
  ok: boolean;
  state?: Record<string, any>;
  command_id: string | null;
}

/** `client.device`: the hub took the hello (`active`), or the device ended or was refused. */
export interface DeviceEvent {
  active: boolean;
  device: Device | null;
  /** Why it ended (`device.ended`): "replaced" when another connection took it over. */
  reason?: string | null;
  /** Why the hello failed. */
  error?: { code: string | number | null; message: string };
}

export declare function deviceHello(config: DeviceConfig): DeviceHello;
export declare function playbackData(report: PlaybackReport): PlaybackUpdate;
/** A `now_playing`'s position (s) at server time `serverNow` (ms), extrapolated while playing. */
export declare function nowPlayingPosition(np: NowPlaying | null | undefined, serverNow: number): number;

/** Devices kept live from `devices.list` and the updates (`all`: the `sessions` channel, admins). Event: `change`. */
export declare class DeviceList {
  constructor(client: RevengeClient, opts?: { all?: boolean; userId?: string });
  readonly client: RevengeClient;
  readonly all: boolean;
  readonly devices: Map<string, Device>;
  readonly loaded: boolean;
  readonly error: unknown;
  readonly size: number;
  start(): Promise<void>;
  stop(): void;
  reload(): Promise<void>;
  /** By user, then name. */
  list(): Device[];
  get(deviceId: string, userId?: string): Device | null;
  on(key: "change", handler: (devices: Device[]) => unknown): () => void;
  on(key: "error", handler: (err: unknown) => unknown): () => void;
  off(key: string, handler: (arg: any) => unknown): void;
}

// ---------------------------------------------------------------- SyncPlay

export interface SyncConfig {
  deadBandS: number;
  releaseBandS: number;
  seekThresholdS: number;
  maxNudge: number;
  nudgeHorizonS: number;
  rateStep: number;
  pausedToleranceS: number;
  seekSettleMs: number;
  seekCooldownMs: number;
  seekCooldownMaxMs: number;
}
export declare const DEFAULT_SYNC_CONFIG: Readonly<SyncConfig>;

/** The local player as the controller sees it (positions in seconds). */
export interface Player {
  position(): number;
  isPlaying(): boolean;
  readonly rate: number;
  setRate(rate: number): void;
  seek(position: number): void;
  play(): void;
  pause(): void;
}

export interface SyncAction {
  kind: "play" | "pause" | "seek" | "rate";
  value?: number;
}

export declare class Timeline {
  position: number;
  when: number;
  rate: number;
  playing: boolean;
  constructor(position: number, when: number, rate: number, playing: boolean);
  at(nowMs: number): number;
  running(nowMs: number): boolean;
}

export interface RoomState {
  room_id: string;
  state: "idle" | "waiting" | "paused" | "playing";
  position: number;
  rate: number;
  updated_at: number;
  updated_by: string | null;
  waiting_on: string[];
  command_seq: number;
  /** Server ms at which `position` holds (added by the hub). */
  when?: number;
}

export interface RoomCommand {
  room_id: string;
  command: "play" | "pause" | "seek" | "rate";
  position: number;
  rate: number;
  when: number;
  issued_by: string | null;
  command_seq: number;
}

export interface Room {
  room_id: string;
  name: string;
  content: { type: "movie" | "episode"; id: string };
  public: boolean;
  has_password: boolean;
  max_participants: number;
  control_mode: "shared" | "leader_only";
  leader_id: string | null;
  state: RoomState["state"];
  member_count: number;
  created_at: number;
}

export interface RoomMember {
  user_id: string;
  username: string;
  is_leader: boolean;
  can_control: boolean;
  is_ready: boolean;
  is_buffering: boolean;
  rtt_ms: number | null;
  [key: string]: unknown;
}

export declare class SyncController {
  constructor(player: Player, serverTime: () => number, config?: Partial<SyncConfig>);
  player: Player;
  config: SyncConfig;
  timeline: Timeline | null;
  commandSeq: number;
  seeks: number;
  rateChanges: number;
  directionChanges: number;
  onCommand(cmd: Partial<RoomCommand> & { command: string; position: number; when: number }, now?: number): SyncAction[];
  onState(state: Partial<RoomState> & { state: string; position: number }, now?: number): SyncAction[];
  onSync(
    hint: { target_position: number; should_be_playing: boolean; at: number; [k: string]: unknown },
    now?: number,
  ): SyncAction[];
  report(rttMs?: number | null, isBuffering?: boolean): Record<string, any>;
  target(now?: number): number | null;
  tick(now?: number): SyncAction[];
}

export declare class MediaElementPlayer implements Player {
  constructor(el: HTMLMediaElement, opts?: { autoMute?: boolean; onAutoplayBlocked?: (muted: boolean) => void });
  el: HTMLMediaElement;
  position(): number;
  isPlaying(): boolean;
  readonly rate: number;
  setRate(rate: number): void;
  seek(position: number): void;
  play(): void;
  pause(): void;
}

export interface SyncPlayOptions {
  config?: Partial<SyncConfig>;
  /** Seconds between corrections (0.25). */
  tickInterval?: number;
  /** Seconds between syncplay.report messages (5). */
  reportInterval?: number;
  /** A stall shorter than this (s) is not reported as buffering (0.75). */
  bufferingDebounce?: number;
  /** The start timer fires this early (ms) and the rest is waited out precisely (50). */
  precisionMs?: number;
  timers?: Partial<Timers>;
}

export interface CreateRoom {
  name: string;
  content: { type: "movie" | "episode"; id: string };
  public?: boolean;
  password?: string;
  max_participants?: number;
  control_mode?: "shared" | "leader_only";
}

export declare class SyncPlay {
  constructor(client: RevengeClient, media: HTMLMediaElement | Player, opts?: SyncPlayOptions);
  readonly client: RevengeClient;
  readonly controller: SyncController;
  readonly player: Player;
  room: Room | null;
  state: RoomState | null;
  members: Map<string, RoomMember>;
  ready: boolean;
  buffering: boolean;
  readonly roomId: string | null;
  readonly isLeader: boolean;
  create(data: CreateRoom): Promise<Room>;
  join(
    roomId: string | null,
    opts?: { password?: string; inviteCode?: string },
  ): Promise<{ room: Room; members: RoomMember[]; state: RoomState }>;
  leave(): Promise<void>;
  end(): Promise<void>;
  play(): Promise<Record<string, any>>;
  pause(position?: number): Promise<Record<string, any>>;
  seek(position: number): Promise<Record<string, any>>;
  setRate(rate: number): Promise<Record<string, any>>;
  chat(message: string): Promise<Record<string, any>>;
  invite(userId?: string): Promise<{ code: string; [k: string]: unknown }>;
  target(): number | null;
  detach(): void;
  on(key: "room", handler: (room: Room) => unknown): () => void;
  on(key: "state", handler: (state: RoomState) => unknown): () => void;
  on(key: "command", handler: (cmd: RoomCommand) => unknown): () => void;
  on(key: "members", handler: (members: RoomMember[]) => unknown): () => void;
  on(key: "ended", handler: (data: { room_id?: string; reason: string }) => unknown): () => void;
  on(key: "autoplay-blocked", handler: (data: { muted: boolean }) => unknown): () => void;
  on(key: string, handler: (data: any) => unknown): () => void;
  off(key: string, handler: (data: any) => unknown): void;
}
