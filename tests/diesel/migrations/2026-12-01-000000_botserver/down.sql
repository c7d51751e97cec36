DROP TABLE message_history;
DROP TABLE user_sessions;
DROP TABLE bots;
DROP TABLE users;
