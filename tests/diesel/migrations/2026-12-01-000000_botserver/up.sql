-- A botserver-like schema: users, bots (global), user_sessions and message_history, keyed by uuid.
CREATE TABLE users (
    user_id uuid PRIMARY KEY,
    username text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE bots (
    id uuid PRIMARY KEY,
    name text NOT NULL
);
CREATE TABLE user_sessions (
    user_id uuid NOT NULL,
    id uuid NOT NULL,
    bot_id uuid NOT NULL,
    title text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, id)
);
CREATE TABLE message_history (
    user_id uuid NOT NULL,
    id uuid NOT NULL,
    session_id uuid NOT NULL,
    role text NOT NULL,
    content text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, id)
);
CREATE INDEX message_history_session ON message_history (user_id, session_id, created_at);
