-- Permission checks: may user U do action A on a resource of kind R (optionally owned by
-- team T) in the context organization? One indexed lookup of the membership (and of the
-- team membership when a team is given); the role matrix is app.role_allows().

-- name: check :scalar
-- True when the member's role allows the action and, for a team-owned resource, the user
-- is in that team or is an owner/admin of the organization.
SELECT coalesce((
  SELECT app.role_allows(m.role, :resource, :action)
         AND (:team_id::uuid IS NULL OR m.role IN ('owner', 'admin')
              OR EXISTS (SELECT 1 FROM team_members tm
                         WHERE tm.org_id = m.org_id AND tm.team_id = :team_id
                           AND tm.user_id = m.user_id))
  FROM memberships m
  WHERE m.org_id = app.org_id() AND m.user_id = :user_id
), false) AS allowed;

-- name: role_allows :scalar
-- The matrix alone, for a role (no membership lookup).
SELECT app.role_allows(:role, :resource, :action);
